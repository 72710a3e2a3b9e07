"""Does our call + synchronize time at N=1K depend on what the process ran before (GPU only)?

Why: the speed grid times ours at the D=64 causal N=1K forward at 0.47-0.49 ms (sessions 12-13),
ab_kernel.py --call-sync the same call at 0.36-0.38 ms, on other instances. In the grid every
config but the first runs in a process where FlexAttention (torch.compile, inductor and its
worker threads and processes) has run; profile_call.py and the grid's first test time ours before
FlexAttention runs in the process, and they agree with ab_kernel.py. This times ours before and
after FlexAttention runs in this process, alternating with FlexAttention and cuDNN, on one
instance. At each stage it also prints the host's time of small pieces (a tree of plain Python
calls, an allocation, our checks, forward and launch at a tiny problem) and the interpreter's
state (threads, profile/trace/monitoring hooks, dynamo's frame callback, the GC): whether all
Python code is slower after FlexAttention ran, or only ours, and why.

Run: python benchmarks/process_context.py   (about 1.5 min; FlexAttention compiles in a subprocess first)
     TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/process_context.py   (no pool of compile workers)
"""

import gc
import importlib
import os
import sys
import threading
import time

import torch

from test_speed import IMPLS, TOKENS, _compile_one, _inputs, forward_call   # the speed grid's calls
from timing import call_sync_percentiles, descendants, host_us

CONFIGS = ((64, True), (128, False))   # (D, causal) at N = 1K: where the grid and ab_kernel.py disagree most
N = 1024
SETTLE_S = 20


def _forward(name, q, k, v, causal):
    return forward_call(IMPLS[name], q, k, v, causal)


def _line(label, call):
    call()
    torch.cuda.synchronize()
    host, total = call_sync_percentiles(call, warmup_s=0.2, timed_s=0.5)
    print(f"  {label:34s} round p10/p50/p90 {'/'.join(f'{x:.3f}' for x in total)} ms;"
          f" host until return {'/'.join(f'{x:.0f}' for x in host)} us", flush=True)


def _leaf(x):
    return x + 1


def _inner(x):
    return _leaf(x) + _leaf(x)


def _python_calls(x=1):   # 7 Python calls, no torch: the interpreter's own call cost
    return _inner(x) + _inner(x) + _inner(x)


_START = time.perf_counter()


def _host_pieces(stage):
    """Host us of small pieces, queued back to back (B = H = 1, N = 128: far below the host's time)."""
    a = importlib.import_module("flashverify.kernels.attention")
    q = torch.randn(1, 1, 128, 128, device="cuda", dtype=torch.float16)
    def check():   # attention()'s checks of a plain call
        return a._check(q, q, q, False, "top_left", None, None, None, None, 0.0, None, False, None)
    pb = check()
    monitoring = [sys.monitoring.get_tool(i) for i in range(6)] if hasattr(sys, "monitoring") else None
    dynamo = sys.modules.get("torch._dynamo")
    callback = torch._C._dynamo.eval_frame.get_eval_frame_callback() if dynamo else "dynamo not imported"
    children, cpu_s = descendants()
    threads = sorted(t.name for t in threading.enumerate())
    print(f"state {stage} (at {time.perf_counter() - _START:.0f} s): descendant processes {children},"
          f" their CPU time so far {cpu_s:.1f} s; TORCHINDUCTOR_COMPILE_THREADS"
          f" {os.environ.get('TORCHINDUCTOR_COMPILE_THREADS', 'unset')}; threads {threads};"
          f" profile {sys.getprofile()}, trace {sys.gettrace()}, monitoring tools {monitoring}; dynamo frame callback {callback};"
          f" gc enabled {gc.isenabled()}, thresholds {gc.get_threshold()}, tracked objects {len(gc.get_objects())};"
          f" switch interval {sys.getswitchinterval()} s; direct launch possible"
          f" {a._direct_launch_possible(a.tk._fwd_kernel) is not None}", flush=True)
    with torch.no_grad():
        for name, fn in (("7 plain Python calls", _python_calls),
                         ("torch.empty_like", lambda: torch.empty_like(q)),
                         ("attention._check", check),
                         ("attention._forward", lambda: a._forward(q, q, q, pb)),
                         ("attention() forward, no_grad", lambda: a.attention(q, q, q))):
            print(f"  host {stage}: {name:30s} {host_us(fn):8.2f} us", flush=True)


def main():
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(len(CONFIGS)) as pool:   # FlexAttention's compiles fill the disk caches
        for problem in pool.imap_unordered(_compile_one, [("flex", torch.float16, d, c, N) for d, c in CONFIGS]):
            if problem:
                print(problem)
    inputs = {cfg: _inputs(TOKENS // N, N, cfg[0], torch.float16) for cfg in CONFIGS}
    _host_pieces("before FlexAttention runs here")
    for (d, causal), (q, k, v) in inputs.items():
        print(f"D{d} {'causal' if causal else 'dense'} N{N} forward, fp16:", flush=True)
        _line("ours, FlexAttention not yet run", _forward("flashverify", q, k, v, causal))
        _line("cuDNN, FlexAttention not yet run", _forward("sdpa-cudnn", q, k, v, causal))
    for (d, causal), (q, k, v) in inputs.items():   # FlexAttention now runs in this process
        _forward("flex", q, k, v, causal)()
    torch.cuda.synchronize()
    _host_pieces("after FlexAttention ran here")
    for (d, causal), (q, k, v) in inputs.items():
        print(f"D{d} {'causal' if causal else 'dense'} N{N} forward, fp16, after FlexAttention ran:", flush=True)
        for turn in range(2):
            for name in ("flashverify", "flex", "sdpa-cudnn"):
                _line(f"{name} (turn {turn + 1})", _forward(name, q, k, v, causal))
    _host_pieces("after both turns")
    time.sleep(SETTLE_S)   # whatever FlexAttention started in the background settles (or not)
    _host_pieces(f"{SETTLE_S} s later")
    for (d, causal), (q, k, v) in inputs.items():
        print(f"D{d} {'causal' if causal else 'dense'} N{N} forward, fp16, {SETTLE_S} s later:", flush=True)
        for name in ("flashverify", "flex", "sdpa-cudnn"):
            _line(name, _forward(name, q, k, v, causal))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("process_context.py times CUDA calls: no CUDA device here")
    main()
