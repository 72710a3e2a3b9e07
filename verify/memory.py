"""Peak extra memory of an attention call, its scaling exponent in N, and the physical minimum.

How the peak is measured:

* **CUDA**: the caching allocator's peak statistic (``torch.cuda.max_memory_allocated``)
  minus what was allocated before the call - every device buffer the call creates.
* **CPU** (Triton's interpreter): a ``TorchDispatchMode`` sees every tensor the call
  allocates through torch (outputs, saved statistics, workspaces, gradients - the same
  buffers the code allocates in GPU memory) and a ``weakref.finalize`` on each new storage
  sees it freed (torch keeps one Python object per storage, so the finalizer runs when the
  last C++ reference dies). Storages that alias an argument (views, ``set_``) are not new
  memory. The interpreter's own numpy tiles stand for registers and shared memory and are
  rightly not counted. Checked against the CUDA statistic on the GPU
  (tests/test_memory.py).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .case import Case


class _AllocationTracker(TorchDispatchMode):
    """Live and peak bytes of the storages allocated while active."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key):
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {_storage(a).data_ptr() for a in tree_leaves((args, kwargs)) if _storage(a) is not None}
        for t in tree_leaves(out):
            s = _storage(t)
            if s is None or s.nbytes() == 0 or s.data_ptr() in seen or s.data_ptr() in self.live:
                continue
            key = s.data_ptr()
            self.live[key] = s.nbytes()
            self.current += s.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(s, self._free, key)
        return out


def _storage(x):
    if isinstance(x, torch.Tensor):
        return x.untyped_storage()
    if isinstance(x, torch.UntypedStorage):
        return x
    return None


def _forward_backward(impl, case: Case, inputs, q, k, v, backward: bool):
    result = impl.forward(case, inputs, q, k, v)
    if backward:
        (result[0] if isinstance(result, tuple) else result).backward(inputs.do)
    return result


def peak_extra_bytes(impl, case: Case, device, backward: bool) -> int:
    """Peak bytes one forward (and backward) allocates beyond its inputs (q, k, v, dO, masks),
    outputs and gradients included: what a user must have free to run it."""
    inputs = case.inputs(device)
    impl.prepare(case, inputs)
    if torch.device(device).type == "cuda":  # warm-up: compilation and autotuning allocate too
        warm = [t.detach().clone().requires_grad_(backward) for t in (inputs.q, inputs.k, inputs.v)]
        _forward_backward(impl, case, inputs, *warm, backward)
        del warm
    q, k, v = (t.detach().clone().requires_grad_(backward) for t in (inputs.q, inputs.k, inputs.v))
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = _forward_backward(impl, case, inputs, q, k, v, backward)
        torch.cuda.synchronize()
        del result
        return torch.cuda.max_memory_allocated() - before
    tracker = _AllocationTracker()
    with tracker:
        result = _forward_backward(impl, case, inputs, q, k, v, backward)
    del result
    return tracker.peak


def physical_minimum(case: Case, backward: bool) -> int:
    """Bytes no exact attention can avoid: O and LSE (float32) forward; plus dQ, dK, dV and
    delta (float32, one per query row) with the backward."""
    esize = torch.tensor([], dtype=case.torch_dtype).element_size()
    rows = case.batch * case.heads_q * case.seqlen_q
    total = rows * case.head_dim * esize + rows * 4
    if backward:
        kv = case.batch * case.heads_kv * case.seqlen_k * case.head_dim * esize
        total += rows * case.head_dim * esize + 2 * kv + rows * 4
    return total


@dataclass
class Scaling:
    """Peak memory against N (Nq = Nk = N), with the least-squares exponent on log-log points."""
    ns: list
    peaks: list
    minimums: list
    exponent: float
    residual: float          # RMS of the log2 residuals of the fit (0 = exactly a power law)

    @property
    def min_ratio(self) -> float:
        """Peak over the physical minimum at the largest N."""
        return self.peaks[-1] / self.minimums[-1]

    def as_dict(self) -> dict:
        return {"n": self.ns, "peak_bytes": self.peaks, "minimum_bytes": self.minimums,
                "exponent": self.exponent, "residual": self.residual, "min_ratio": self.min_ratio}


def fit_exponent(ns, peaks) -> tuple[float, float]:
    """Slope and RMS residual of log2(peak) against log2(N), by least squares."""
    xs = [math.log2(n) for n in ns]
    ys = [math.log2(max(p, 1)) for p in peaks]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    residual = math.sqrt(sum((y - (my + slope * (x - mx))) ** 2 for x, y in zip(xs, ys)) / len(xs))
    return slope, residual


def scaling(impl, base: Case, ns, device, backward: bool) -> Scaling:
    """Peak extra memory of `impl` on `base` with Nq = Nk = each N."""
    peaks, minimums = [], []
    for n in ns:
        case = base.replace(seqlen_q=n, seqlen_k=n)
        peaks.append(peak_extra_bytes(impl, case, device, backward))
        minimums.append(physical_minimum(case, backward))
    exponent, residual = fit_exponent(ns, peaks)
    return Scaling(list(ns), peaks, minimums, exponent, residual)
