"""Where one call's time goes (GPU only): host time, GPU time and the kernels of one forward and
one backward, for the bundled kernel, SDPA's cuDNN backend and FlexAttention, at a few grid shapes.

Why: test_speed.py times a call plus a synchronize, as a user sees it; at small N that time is
far above the kernels' own (tune.py, do_bench). This separates the host's share from the GPU's.

Run: python benchmarks/profile_call.py [D N causal ...]   (default: 64 1024 0  128 1024 0  128 16384 0)
FlexAttention compiles first, in parallel processes (test_speed.compiled_shapes), as in the speed grid.
"""

import sys

import torch

from test_speed import IMPLS, TOKENS, _inputs, compiled_shapes, forward_call, gradients   # the speed grid's calls
from timing import call_sync_ms, call_sync_percentiles, host_us

PROFILED = ("flashverify", "sdpa-cudnn", "flex")


def _call_sync_split(fn, rounds=100):
    """Call + synchronize rounds split: percentiles (10/50/90) of the host's time until the call
    returns (us) and of the whole round (ms), without the profiler; then the GPU time of the
    round's kernels (ms, torch's profiler, summed per round). Why: the speed grid's call+sync
    time at N=1K was 0.1-0.3 ms above do_bench's kernel time and varied between rounds by as
    much; this says whether that follows host time, kernel time, or neither (the gap between)."""
    host, total = call_sync_percentiles(fn, warmup_s=0.0, timed_s=0.0, min_calls=rounds)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            fn()
            torch.cuda.synchronize()
    kernels = sum(e.self_device_time_total for e in prof.key_averages()) / rounds / 1e3   # each kernel once
    return host, total, kernels


def profile(d, n, causal):
    from triton.testing import do_bench
    q, k, v = _inputs(TOKENS // n, n, d, torch.float16)
    for name in PROFILED:
        fn = IMPLS[name]
        o = fn(q, k, v, causal)
        do = torch.randn_like(o)

        def bwd():
            gradients(o, (q, k, v), do)
        for direction, call in (("fwd", forward_call(fn, q, k, v, causal)), ("bwd", bwd)):
            call()
            torch.cuda.synchronize()
            step, host, gpu = call_sync_ms(call), host_us(call, calls=50, batches=1), do_bench(call, warmup=5, rep=30)
            print(f"{name:12s} {direction} D{d} N{n} {'causal' if causal else 'dense '}: call+sync {step:.3f} ms,"
                  f" back-to-back {gpu:.3f} ms, host {host:.0f} us/call", flush=True)
            ret, total, kernels = _call_sync_split(call)
            print(f"{name:12s} {direction} D{d} N{n} {'causal' if causal else 'dense '}: call+sync split (p10/p50/p90):"
                  f" host until the call returns {'/'.join(f'{x:.0f}' for x in ret)} us,"
                  f" round {'/'.join(f'{x:.3f}' for x in total)} ms; kernels {kernels:.3f} ms", flush=True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    call()
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
        if name == "flashverify":   # the kernel's own backward, without autograd's engine around it
            _direct_backward(q, k, v, do, causal)


def _direct_backward(q, k, v, do, causal):
    import importlib
    from triton.testing import do_bench

    from ab_kernel import _outputs   # the kernel's own forward and backward, as the A/B calls them
    a = importlib.import_module("flashverify.kernels.attention")
    pb, (o, stats), _ = _outputs(a, q, k, v, do, causal)

    def call():
        a._backward(q, k, v, o, stats, do, pb)
    print(f"{'_backward':12s} bwd direct: call+sync {call_sync_ms(call):.3f} ms, back-to-back"
          f" {do_bench(call, warmup=5, rep=30):.3f} ms, host {host_us(call, calls=50, batches=1):.0f} us/call",
          flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("profile_call.py needs a CUDA device")
    shapes = compiled_shapes(sys.argv[1:], [64, 1024, 0, 128, 1024, 0, 128, 16384, 0])
    for shape in shapes:
        profile(*shape)
