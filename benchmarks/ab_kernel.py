"""The bundled kernel against another version of it, timed in one process (GPU), or compared
for equal results only (--check, also on the CPU interpreter).

Why: between two machines of one GPU model the same kernel's time moves by up to 6 % (H100,
sessions 5-6), more than many changes gain; only both versions in one process tell a change
from the machine. The other version is a copy of kernels/ (attention.py, triton_kernels.py,
tiles/), e.g. HEAD's:

    mkdir -p ab/base && git archive HEAD kernels | tar -x --strip-components=1 -C ab/base
    python benchmarks/ab_kernel.py ab/base        # fp16 grid: D 64/128, dense/causal, N 1K/4K/16K
    python benchmarks/ab_kernel.py ab/base --check --n 96   # results only
    python benchmarks/ab_kernel.py ab/base --call-sync      # as the speed grid times: host time included
    python benchmarks/ab_kernel.py ab/base --host           # the host's Python alone, launches no-ops (CPU too: the GPU's host path)

Both versions take their tile tables from their own tiles/ (the fixed tiles where it has none
for this GPU). Prints new/base time per config and the largest normwise difference of O, dQ,
dK, dV (0 when the change must leave results bitwise unchanged). Each version is timed ROUNDS
times per config, the two taking turns at going first: timed once each, base then new, identical
forwards came out 0.995-1.14 of each other, new the slower in 11 of 12 configs (H200, session 10).
Each ratio comes with the range of its rounds' ratios (new over base, round by round): a change
smaller than that range is not told from noise.
"""

import argparse
import importlib
import importlib.util
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch
from triton.runtime.jit import JITFunction

from timing import call_sync_ms

H = 16
DS, CAUSAL, NS, TOKENS = (64, 128), (False, True), (1024, 4096, 16384), 32768
ROUNDS = 6   # per version and config, in alternating order; the median is reported, and the range of
#              the rounds' ratios (H200, session 17: a config whose backward ran the same tiles in both
#              versions read 0.948 from 4 rounds, so one A/B's ratio carries a few % of noise)


def _load(base_dir):
    """The other version as package `ab_base` (its attention.py imports `.triton_kernels`)."""
    if "ab_base" in sys.modules:
        return sys.modules["ab_base.attention"]
    path = os.path.abspath(base_dir)
    for name in ("attention.py", "triton_kernels.py"):
        if not os.path.exists(os.path.join(path, name)):
            raise SystemExit(f"base {base_dir!r} has no {name}: give a copy of kernels/ (see --help)")
    init = os.path.join(path, "__init__.py")
    spec = importlib.util.spec_from_file_location("ab_base", init if os.path.exists(init) else None,
                                                  submodule_search_locations=[path])
    sys.modules["ab_base"] = importlib.util.module_from_spec(spec)
    return importlib.import_module("ab_base.attention")


def _versions(base_dir):
    new = importlib.import_module("flashverify.kernels.attention")   # first: it picks the interpreter without CUDA
    return {"base": _load(base_dir), "new": new}


def _inputs(b, n, d, device):
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(b, H, n, d, device=device, dtype=torch.float16, generator=g) for _ in range(4)]


def _problem(a, q, k, v, causal):
    return a._check(q, k, v, causal, "top_left", None, None, None, None, 0.0, None, False, None)


def _outputs(a, q, k, v, do, causal):
    pb = _problem(a, q, k, v, causal)
    o, _, stats = a._forward(q, k, v, pb)
    return pb, (o, stats), [o, *a._backward(q, k, v, o, stats, do, pb)]


def _warm(job):
    """Worker: compile one version's kernels for one config (Triton's disk cache keeps them)."""
    base_dir, name, d, causal = job
    q, k, v, do = _inputs(1, 256, d, "cuda")
    _outputs(_versions(base_dir)[name], q, k, v, do, causal)
    torch.cuda.synchronize()


def _difference(xs, ys):
    return max(((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
               for x, y in zip(xs, ys))


def _calls(a, run, q, k, v, do, causal, call_sync):
    """The forward and backward to time: the kernels' own entry points, or (call_sync) the public
    function and autograd, as a user calls them."""
    pb, (o, stats), _ = run
    if not call_sync:
        return (lambda: a._forward(q, k, v, pb)), (lambda: a._backward(q, k, v, o, stats, do, pb))
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = a.attention(*leaves, causal=causal)

    def forward():
        with torch.no_grad():
            a.attention(q, k, v, causal=causal)
    return forward, (lambda: torch.autograd.grad(out, leaves, do, retain_graph=True))


class _Compiled:
    """A compiled kernel whose launcher does nothing (see _host_times)."""
    function = packed_metadata = None

    def run(self, *launch):
        pass


class _NoLaunch(JITFunction):
    """Stands in for one of the bundled Triton kernels, as a JITFunction with the kernel's own
    signature (so attention._run takes its direct path after the first launch, as on a GPU):
    kernel[grid](...) compiles nothing and returns a _Compiled."""
    __hash__ = object.__hash__   # a JITFunction hashes its source's cache key: this one has no dependencies resolved
    __eq__ = object.__eq__

    def __init__(self, kernel):
        unspecialized = ([p.name for p in kernel.params if p.do_not_specialize] if isinstance(kernel, JITFunction)
                         else getattr(kernel, "kwargs", {}).get("do_not_specialize", ()))   # the interpreter's
        super().__init__(getattr(kernel, "fn", kernel), do_not_specialize=unspecialized)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _Compiled()


class _NoDriver:
    class active:
        get_current_stream = staticmethod(lambda device: 0)


def _as_on_a_gpu(a):
    """On the CPU: make version `a` take the GPU's host path (no interpreter, the H200's tile table,
    a stream getter), for tensors that stay on the CPU. It patches the loaded module."""
    a.interpreting = lambda: False
    a._check_device = lambda q: None
    a.device_slug = lambda device: "nvidia-h200"
    a.driver = _NoDriver
    torch.cuda.current_device = lambda: 0


def _host_times(versions, device, rounds=15):
    """Host time of attention() (no_grad), _forward and _backward per version, in us: the Python
    around the launches, with every kernel's launch a no-op, on a tiny problem. Each kernel is a
    stand-in JITFunction, so launches after the first take attention._run's direct path, as on a
    GPU; on the CPU each version is also made to take the GPU's host path (_as_on_a_gpu; dQ's
    second stream excepted). The minimum over `rounds` alternating rounds of 3 x 2,000 calls. On
    the development CPU, single runs of the same code ranged 43-66 us for _backward, and this
    minimum 42.3-47.3 us over four runs (session 12). Runs on the CPU too.
    It replaces the kernels in the loaded modules, so nothing in this process may launch after it."""
    import timeit
    q, k, v, do = _inputs(1, 128, 128, device)
    o, stats = q.clone(), torch.zeros(128, device=device)
    calls = {}
    for name, a in versions.items():
        if device == "cpu":
            _as_on_a_gpu(a)
        for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_delta_kernel"):
            setattr(a.tk, kernel, _NoLaunch(getattr(a.tk, kernel)))
        pb = _problem(a, q, k, v, False)
        calls[name] = {"attention()": lambda a=a: a.attention(q, k, v),
                       "_forward": lambda a=a, pb=pb: a._forward(q, k, v, pb),
                       "_backward": lambda a=a, pb=pb: a._backward(q, k, v, o, stats, do, pb)}
    best = {}
    with torch.no_grad():
        for r in range(rounds):
            for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
                for what, call in calls[name].items():
                    us = min(timeit.repeat(call, number=2000, repeat=3)) / 2000 * 1e6
                    best[name, what] = min(best.get((name, what), float("inf")), us)
    for what in calls["new"]:
        print(f"{what:12s} host time without launches: base {best['base', what]:6.2f} us, "
              f"new {best['new', what]:6.2f} us ({best['new', what] / best['base', what]:.3f})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", help="a copy of kernels/ holding the other version")
    ap.add_argument("--check", action="store_true", help="compare results only, no timing (works on the CPU)")
    ap.add_argument("--call-sync", action="store_true",
                    help="time calls as the speed grid does (attention() and autograd, each call synchronized), "
                         "not the kernels back to back: host-side changes show only so")
    ap.add_argument("--host", action="store_true",
                    help="the host's time alone: every launch a no-op, a tiny problem (works on the CPU)")
    ap.add_argument("--n", type=int, nargs="+", default=None, help=f"sequence lengths (default {NS}; --check: 96)")
    ap.add_argument("--rounds", type=int, default=15, help="--host: alternating rounds, the minimum kept (default 15)")
    args = ap.parse_args(argv)
    ns = args.n or ((96,) if args.check else NS)
    if any(n < 1 for n in ns):
        ap.error(f"--n: sequence lengths must be >= 1, got {ns}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.check and args.call_sync:
        ap.error("--call-sync chooses how calls are timed and --check times nothing: give one of them")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.host and (args.check or args.call_sync or args.n):
        ap.error("--host times the host alone, on one tiny problem: give it without --check, --call-sync and --n")
    if not (args.check or args.host) and device == "cpu":
        ap.error("timing the kernels needs a GPU; on the CPU use --check or --host")
    versions = _versions(args.base)
    if args.host:
        return _host_times(versions, device, args.rounds)
    if not args.check:
        start = time.time()
        jobs = [(args.base, name, d, c) for name in versions for d in DS for c in CAUSAL]
        with mp.get_context("spawn").Pool(min(14, os.cpu_count() or 1)) as pool:
            list(pool.imap_unordered(_warm, jobs))
        print(f"compiled in {time.time() - start:.0f} s", flush=True)
        from triton.testing import do_bench
    worst = 0.0
    for d in DS:
        for causal in CAUSAL:
            for n in ns:
                q, k, v, do = _inputs(max(1, TOKENS // n) if not args.check else 1, n, d, device)
                runs = {name: _outputs(a, q, k, v, do, causal) for name, a in versions.items()}
                diff = _difference(runs["new"][2], runs["base"][2])
                worst = max(worst, diff)
                line = f"D{d} {'causal' if causal else 'dense '} N{n:6d}: max normwise difference {diff:.1e}"
                if not args.check:
                    times = {}
                    calls = {name: _calls(a, runs[name], q, k, v, do, causal, args.call_sync)
                             for name, a in versions.items()}
                    for r in range(ROUNDS):   # the versions take turns at going first (see the docstring)
                        for name in (("base", "new") if r % 2 == 0 else ("new", "base")):
                            for s, call in zip(("fwd", "bwd"), calls[name]):
                                times.setdefault((name, s), []).append(
                                    call_sync_ms(call) if args.call_sync else do_bench(call, warmup=5, rep=20))
                    ms = {key: statistics.median(ts) for key, ts in times.items()}
                    for s in ("fwd", "bwd"):
                        ratios = [x / y for x, y in zip(times["new", s], times["base", s])]   # round by round
                        line += (f"; {s} base {ms['base', s]:.3f} new {ms['new', s]:.3f} ms "
                                 f"({ms['new', s] / ms['base', s]:.3f}, rounds {min(ratios):.3f}-{max(ratios):.3f})")
                print(line, flush=True)
    print(f"largest difference {worst:.1e}")


if __name__ == "__main__":
    sys.exit(main())
