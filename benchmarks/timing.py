"""The host-side timers of the GPU tools (test_speed.py, profile_call.py, ab_kernel.py, host_cost.py).

Three questions, three timers:

* call_sync_ms: how long a caller waits for one call. Each call is followed by a synchronize,
  and the median is taken over rounds, so host time counts as it does in the speed grid
  (call_sync_rounds: each round's time and the host's share of it).
* back_to_back_ms: time per call while calls queue back to back, one synchronize per batch. In
  steady state that is the larger of host and GPU time per call: what a training loop sees, and
  how FlashAttention's benchmark scripts time (torch.utils.benchmark: a synchronize per block of
  calls). triton.testing.do_bench times the GPU alone.
* host_us: how long the host takes per call while calls queue back to back with no synchronize
  between them. That is host time alone as long as the GPU's work per call is shorter (a small
  problem) and the batch does not fill the launch queue.

(test_speed.py's call + synchronize time goes through pytest-benchmark, its _rounds only sizing
the rounds; its back-to-back time is back_to_back_ms.) And one question about what else runs:
descendants, the processes this one started and the CPU time they used (inductor's compile
workers), which test_speed.py records beside each test's times.
"""

import math
import os
import statistics
import time


def _cuda_synchronize():
    import torch
    torch.cuda.synchronize()


def call_sync_rounds(call, warmup_s=0.1, timed_s=0.25, min_calls=10, synchronize=_cuda_synchronize):
    """Per timed round of call + synchronize: (us until the call returned, ms until the
    synchronize returned), over at least timed_s and min_calls calls after warmup_s of calls.
    Why both: at N=1K a round's time varies by more than the host time a change saves, and only
    the host's share per round says whether the spread follows the host or the GPU."""
    rounds, start = [], time.perf_counter()
    while time.perf_counter() - start < warmup_s + timed_s or len(rounds) < min_calls:
        t = time.perf_counter()
        call()
        returned = time.perf_counter()
        synchronize()
        if t - start >= warmup_s:
            rounds.append(((returned - t) * 1e6, (time.perf_counter() - t) * 1e3))
    return rounds


def call_sync_ms(call, warmup_s=0.1, timed_s=0.25, min_calls=10, synchronize=_cuda_synchronize):
    """Median ms of call + synchronize (call_sync_rounds): how long a caller waits for one call."""
    return statistics.median(total for _, total in call_sync_rounds(call, warmup_s, timed_s, min_calls, synchronize))


def call_sync_percentiles(call, warmup_s=0.1, timed_s=0.25, min_calls=10, synchronize=_cuda_synchronize):
    """10th/50th/90th percentiles of call_sync_rounds: (us until the call returned, ms of the round)."""
    rounds = call_sync_rounds(call, warmup_s, timed_s, min_calls, synchronize)
    return percentiles([host for host, _ in rounds]), percentiles([total for _, total in rounds])


def percentiles(values, ps=(10, 50, 90)):
    """The values' ps-th percentiles (nearest rank), for a spread in one line."""
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, max(0, math.ceil(p / 100 * len(ordered)) - 1))] for p in ps]


def back_to_back_ms(call, timed_s=0.25, batches=3, synchronize=_cuda_synchronize):
    """Median over batches of ms per call, calls queued back to back and a synchronize ending each
    batch; batches of at least 3 calls, sized from one call so that they last timed_s in all."""
    synchronize()
    t = time.perf_counter()
    call()
    synchronize()
    calls = max(3, math.ceil(timed_s / batches / max(time.perf_counter() - t, 1e-9)))
    per_batch = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize()
        per_batch.append((time.perf_counter() - t) / calls * 1e3)
    return statistics.median(per_batch)


def host_us(call, calls=300, batches=7, synchronize=_cuda_synchronize):
    """Median over batches of the host's us per call, calls queued back to back (one call and a
    synchronize first, so nothing earlier is still queued)."""
    call()
    synchronize()
    per_batch = []
    for _ in range(batches):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        per_batch.append((time.perf_counter() - t) / calls * 1e6)
        synchronize()
    return statistics.median(per_batch)


def descendants():
    """(processes, CPU seconds used so far) of this process's descendants, from /proc (Linux; (0, 0)
    elsewhere): the background a timing shares the host with. Why: FlexAttention's first call
    starts inductor's pool of compile workers (by torch's source, one process per core up to 32),
    and their start-up fell on the speed grid's next tests (H200, session 15)."""
    procs = {}
    for name in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()   # after "pid (comm)": state, ppid, ...
        except (OSError, ValueError, IndexError):
            continue
        procs[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    found, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, (ppid, _) in procs.items() if ppid in frontier} - found
        found |= frontier
    return len(found), sum(procs[pid][1] for pid in found)
