"""Back-to-back time over a long window, event by event (GPU only): grid configs' backwards (or
forwards), for the bundled kernel, FlexAttention and SDPA's cuDNN backend, in alternating rounds.

Why: in session 18's grid our D=128 dense N=1K backward took longer per call back to back
(2.346 ms) than by call + synchronize (2.267 ms), where every other 1K backward is 3-38 % faster
back to back and FlexAttention's was too (docs/performance.md). The grid's back-to-back time is
the median of 3 batches of about 0.08 s (timing.back_to_back_ms). Here each round queues calls
for WINDOW_S with a CUDA event every EVENT_CALLS calls, so the ms per call is seen along the
window: a rise along it (clocks under sustained load) differs from a level offset (our calls).

Each config ends with the medians over the rounds of both timings and, round by round, in how many
ours was the faster: a gap within the rounds' spread shows as a split count.

The forward (--direction fwd): session 21's fp16 grid had our D=128 causal 1K forward at 0.99 of
FlexAttention by call + synchronize and 1.18 back to back, each from under a second of calls.

Run: python benchmarks/back_to_back_window.py [--dtype fp16|bf16] [--direction bwd|fwd] [D N CAUSAL ...]
(default: fp16, bwd, 128 1024 0  128 1024 1: the two D=128 1K backwards at parity with FlexAttention,
sessions 16-20)
"""

import statistics
import sys
import time

import torch

from test_speed import DTYPE_IDS, IMPLS, TOKENS, _inputs, compiled_shapes, forward_call, gradients   # the speed grid's calls
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


def main(d, n, causal, dtype, direction):
    q, k, v = _inputs(TOKENS // n, n, d, dtype)
    config = f"{direction} {DTYPE_IDS[dtype]} D{d} N{n} {'causal' if causal else 'dense'}"
    calls = {}
    for name in COMPARED:
        if direction == "fwd":
            calls[name] = forward_call(IMPLS[name], q, k, v, causal)
            continue
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


OPTIONS = {"--dtype": {v: k for k, v in DTYPE_IDS.items()}, "--direction": {"bwd": "bwd", "fwd": "fwd"}}


def options_and_rest(argv):
    """({--dtype: torch dtype, --direction: 'bwd' or 'fwd'}, the other arguments) from leading
    options (defaults fp16, bwd)."""
    chosen = {"--dtype": torch.float16, "--direction": "bwd"}
    while argv[:1] and argv[0] in OPTIONS:
        name, accepted = argv[0], OPTIONS[argv[0]]
        if len(argv) < 2 or argv[1] not in accepted:
            raise SystemExit(f"{name}: one of {', '.join(accepted)}, got {argv[1] if len(argv) > 1 else 'nothing'}")
        chosen[name], argv = accepted[argv[1]], argv[2:]
    return chosen, argv


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("back_to_back_window.py needs a CUDA device")
    chosen, argv = options_and_rest(sys.argv[1:])
    for shape in compiled_shapes(argv, [128, 1024, 0, 128, 1024, 1], chosen["--dtype"]):
        main(*shape, chosen["--dtype"], chosen["--direction"])
