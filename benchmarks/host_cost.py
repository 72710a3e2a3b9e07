"""Host time of the bundled kernel's calls, piece by piece (GPU only).

Why: at N=1K the speed grid's call + synchronize time is 0.1-0.3 ms above the kernels' own time
(profile_call.py), and our backward's host time (350-400 us a call) is above FlexAttention's
(about 210) and cuDNN's (about 150). This says which part of a call takes it: the argument
checks, the allocations, Triton's JITFunction.run (argument binding and specialization, cache
key, launch), the compiled kernel's own launcher under it, or attention._run's direct launch
(which calls that launcher once Triton has compiled the kernel).

A tiny problem (B = H = 1, N = 128) keeps the GPU's work per call far below the host's, so calls
queued back to back measure host time alone. Prints microseconds per call (median of 7 batches).

Run: python benchmarks/host_cost.py
"""

import importlib
import sys

import torch

from timing import host_us


def _capture(kernel):
    """The arguments of the kernel's next launch: (grid, args, kwargs), by wrapping its run()."""
    seen = {}
    run = kernel.run

    def spy(*args, grid, warmup, **kwargs):
        seen.update(grid=grid, args=args, kwargs=kwargs)
        return run(*args, grid=grid, warmup=warmup, **kwargs)
    kernel.run = spy
    return seen, lambda: setattr(kernel, "run", run)


def main():
    a = importlib.import_module("flashverify.kernels.attention")
    tk = a.tk
    q, k, v, do = (torch.randn(1, 1, 128, 128, device="cuda", dtype=torch.float16) for _ in range(4))
    def check():   # attention()'s checks of a plain call: causal=False, no mask, window, dropout
        return a._check(q, k, v, False, "top_left", None, None, None, None, 0.0, None, False, None)
    pb = check()
    o, lse, stats = a._forward(q, k, v, pb)
    print(f"torch {torch.__version__}, triton {importlib.import_module('triton').__version__}, "
          f"{torch.cuda.get_device_name()}; host us per call (B = H = 1, N = 128, D = 128, fp16)", flush=True)

    def row(name, fn):   # printed as measured: a failing row keeps those before it
        print(f"{name:58s} {host_us(fn):8.1f}", flush=True)

    with torch.no_grad():
        row("attention() forward, no_grad", lambda: a.attention(q, k, v))
    row("_check", check)
    row("_checked (a plain call seen before: from memory)",
        lambda: a._checked(q, k, v, False, "top_left", None, None, None, None, 0.0, None, False, None))
    row("_forward", lambda: a._forward(q, k, v, pb))
    row("_backward", lambda: a._backward(q, k, v, o, stats, do, pb))
    row("torch.empty_like x1", lambda: torch.empty_like(q))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = a.attention(*leaves)
    row("autograd.grad of attention()", lambda: torch.autograd.grad(out, leaves, do, retain_graph=True))

    # the GPU-only host work of _backward around its launches (its second stream, see _backward)
    caller, side = torch.cuda.current_stream(), a._side_stream(q.device)
    row("_backward's streams: torch.cuda.current_stream(device)", lambda: torch.cuda.current_stream(q.device))
    row("_backward's streams: side.wait_stream(caller)", lambda: side.wait_stream(caller))

    def stream_context():
        with torch.cuda.stream(side):
            pass
    row("_backward's streams: with torch.cuda.stream(side)", stream_context)
    side_stream = a._side_stream
    a._side_stream = lambda device: torch.cuda.current_stream(device)   # dQ on the caller's stream
    try:
        row("_backward with its side stream = the caller's", lambda: a._backward(q, k, v, o, stats, do, pb))
    finally:
        a._side_stream = side_stream

    triton_path = a._direct_launch_possible
    a._direct_launch_possible = lambda kernel: None   # every launch through JITFunction.run, as before _run
    try:
        row("_forward, every launch through JITFunction.run", lambda: a._forward(q, k, v, pb))
        row("_backward, every launch through JITFunction.run", lambda: a._backward(q, k, v, o, stats, do, pb))
    finally:
        a._direct_launch_possible = triton_path

    for name, kernel, call in (("fwd", tk._fwd_kernel, lambda: a._forward(q, k, v, pb)),
                               ("dkdv", tk._bwd_dkdv_kernel, lambda: a._backward(q, k, v, o, stats, do, pb)),
                               ("dq", tk._bwd_dq_kernel, lambda: a._backward(q, k, v, o, stats, do, pb)),
                               ("delta", tk._bwd_delta_kernel, lambda: a._backward(q, k, v, o, stats, do, pb))):
        seen, restore = _capture(kernel)
        a._COMPILED.clear()   # so that the call launches through JITFunction.run, where _capture sees it
        call()
        restore()
        torch.cuda.synchronize()
        grid, args, kwargs = seen["grid"], seen["args"], seen["kwargs"]
        row(f"{name}: kernel[grid](...) (JITFunction.run), {len(args)} args", lambda: kernel[grid](*args, **kwargs))
        binder = kernel.device_caches[torch.cuda.current_device()][4]
        row(f"{name}:   its argument binder alone", lambda: binder(*args, **kwargs))
        compiled = kernel[grid](*args, **kwargs)
        params = binder(*args, **kwargs)[0]
        runner = compiled[tuple(grid) + (1,) * (3 - len(grid))]   # this launcher takes all three
        stream = torch.cuda.current_stream().cuda_stream
        row(f"{name}:   compiled kernel's launcher alone", lambda: runner(*params.values(), stream=stream))
        options = {key: kwargs[key] for key in ("num_warps", "num_stages") if key in kwargs}
        constexprs = {key: value for key, value in kwargs.items() if key not in options}
        row(f"{name}:   attention._run (its direct launch)", lambda: a._run(kernel, grid, args, constexprs, **options))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("host_cost.py measures CUDA launches: no CUDA device here")
    main()
