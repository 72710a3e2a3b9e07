"""Back-to-back time over a long window, event by event (GPU only): grid configs' backwards,
for the bundled kernel, FlexAttention and SDPA's cuDNN backend, in alternating rounds.

Why: in session 18's grid our D=128 dense N=1K backward took longer per call back to back
(2.346 ms) than by call + synchronize (2.267 ms), where every other 1K backward is 3-38 % faster
back to back and FlexAttention's was too (docs/performance.md). The grid's back-to-back time is
the median of 3 batches of about 0.08 s (timing.back_to_back_ms). Here each round queues calls
for WINDOW_S with a CUDA event every EVENT_CALLS calls, so the ms per call is seen along the
window: a rise along it (clocks under sustained load) differs from a level offset (our calls).

Each config ends with the medians over the rounds of both timings and, round by round, in how many
ours was the faster: a gap within the rounds' spread shows as a split count.

Run: python benchmarks/back_to_back_window.py [--dtype fp16|bf16] [D N CAUSAL ...]   (default: fp16,
128 1024 0  128 1024 1: the two D=128 1K backwards at parity with FlexAttention, sessions 16-20)
"""

import statistics
import sys
import time

import torch

from test_speed import DTYPE_IDS, IMPLS, TOKENS, _inputs, compiled_shapes, gradients   # the speed grid's calls
from timing import call_sync_ms

COMPARED = ("flashverify", "flex", "sdpa-cudnn")
ROUNDS, WINDOW_S, EVENT_CALLS = 6, 2.0, 25


def window(call):
    """ms per call between consecutive events over one WINDOW_S of calls queued back to back."""
    torch.cuda.synchronize()
    t = time.perf_counter()
    call()
    torch.cuda.synchronize()
    segments = max(4, round(WINDOW_S / max(time.perf_counter() - t, 1e-9) / EVENT_CALLS))
    events = [torch.cuda.Event(enable_timing=True) for _ in range(segments + 1)]
    events[0].record()
    for e in events[1:]:
        for _ in range(EVENT_CALLS):
            call()
        e.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) / EVENT_CALLS for a, b in zip(events, events[1:])]


def round_summary(config, rounds):
    """Lines for one config from {name: [(call + synchronize ms, back-to-back ms), ...] per round}:
    each implementation's medians, then ours against FlexAttention (speed, so above 1 is faster)."""
    lines = []
    for name, timed in rounds.items():
        sync, b2b = (statistics.median(t[i] for t in timed) for i in (0, 1))
        lines.append(f"{config} {name:12s} over {len(timed)} rounds: call+sync {sync:.3f} ms, back to back {b2b:.3f} ms")
    ours, flex = rounds["flashverify"], rounds["flex"]
    parts = []
    for i, timing in enumerate(("call+sync", "back to back")):
        ratio = statistics.median(f[i] for f in flex) / statistics.median(o[i] for o in ours)
        wins = sum(o[i] < f[i] for o, f in zip(ours, flex))
        parts.append(f"{timing} {ratio:.3f} (ours faster in {wins} of {len(ours)} rounds)")
    lines.append(f"{config} ours/flex speed: " + "; ".join(parts))
    return lines


def main(d, n, causal, dtype):
    q, k, v = _inputs(TOKENS // n, n, d, dtype)
    config = f"{DTYPE_IDS[dtype]} D{d} N{n} {'causal' if causal else 'dense'}"
    calls = {}
    for name in COMPARED:
        o = IMPLS[name](q, k, v, causal)
        do = torch.randn_like(o)
        calls[name] = lambda o=o, do=do: gradients(o, (q, k, v), do)
    order = list(COMPARED)
    series = {name: [] for name in COMPARED}   # per round: (call + synchronize ms, back-to-back ms, the window's segments)
    for r in range(ROUNDS):
        for name in order if r % 2 == 0 else order[::-1]:
            sync = call_sync_ms(calls[name])
            ms = window(calls[name])
            b2b = statistics.median(ms)
            series[name].append((sync, b2b, ms))
            quarters = [statistics.median(ms[i * len(ms) // 4:(i + 1) * len(ms) // 4]) for i in range(4)]
            print(f"{config} round {r} {name:12s} call+sync {sync:.3f} ms; back to back {b2b:.3f} ms"
                  f" (median of {len(ms)} segments of {EVENT_CALLS} calls; by quarter of the window:"
                  f" {' '.join(f'{x:.3f}' for x in quarters)})", flush=True)
    for name in COMPARED:
        firsts = [ms[0] for _, _, ms in series[name]]
        rest = [x for _, _, ms in series[name] for x in ms[1:]]
        print(f"{config} {name:12s} back to back: first segment of each window {statistics.median(firsts):.3f} ms,"
              f" the rest {statistics.median(rest):.3f} ms (min {min(rest):.3f}, max {max(rest):.3f})")
    print("\n".join(round_summary(config, {name: [t[:2] for t in timed] for name, timed in series.items()})), flush=True)


def dtype_and_rest(argv):
    """(dtype, the other arguments) from a leading `--dtype fp16|bf16` (default fp16)."""
    if argv[:1] != ["--dtype"]:
        return torch.float16, argv
    named = {v: k for k, v in DTYPE_IDS.items()}
    if len(argv) < 2 or argv[1] not in named:
        raise SystemExit(f"--dtype: one of {', '.join(named)}, got {argv[1] if len(argv) > 1 else 'nothing'}")
    return named[argv[1]], argv[2:]


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("back_to_back_window.py needs a CUDA device")
    dtype, argv = dtype_and_rest(sys.argv[1:])
    for shape in compiled_shapes(argv, [128, 1024, 0, 128, 1024, 1], dtype):
        main(*shape, dtype)
