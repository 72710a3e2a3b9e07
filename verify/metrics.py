"""Error metrics of one tensor against its oracle.

Non-finite values are compared by position first: a kernel NaN/Inf where the
oracle is finite (or the reverse) is reported as such and never averaged away.
Where both are the same infinity (e.g. LSE = -inf on a fully masked row) the
element agrees exactly and contributes zero error.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import math

import torch

# Spacing of floating-point numbers near 1, i.e. 2 * unit roundoff.
EPS = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23, torch.float64: 2.0**-52}


@dataclass(frozen=True)
class TensorError:
    max_abs: float
    p99_abs: float        # 99th percentile of |x - ref|: the typical worst, not one outlier
    rel_fro: float        # ||x - ref||_F / ||ref||_F over elements where both are finite
    rmse: float
    max_ulp: float        # max |x - ref| in ulps of the output dtype at |ref|, |ref| floored at ULP_FLOOR x RMS
    kernel_nonfinite: int   # kernel NaN/Inf where the oracle is finite
    oracle_nonfinite: int   # oracle NaN/Inf where the kernel is finite
    mismatched_inf: int     # both infinite but different (NaN vs Inf, or opposite signs)
    numel: int

    @property
    def finite_mismatch(self) -> int:
        return self.kernel_nonfinite + self.oracle_nonfinite + self.mismatched_inf

    def as_dict(self):
        return asdict(self)


# Elements far below the tensor's typical size (cancellation: a dQ entry of 1e-30 among entries of
# 1e-2) would report ulps of their own tiny magnitude, 1e30 of them for a harmless absolute error;
# their ulps are counted at 1% of the tensor's RMS instead.
ULP_FLOOR = 0.01


def _ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Size of one ulp of `dtype` at |ref| (subnormal spacing floors it)."""
    finfo = torch.finfo(dtype)
    mag = ref.abs().clamp_min(finfo.tiny)
    exponent = torch.floor(torch.log2(mag))
    return torch.exp2(exponent) * EPS[dtype]


def tensor_error(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> TensorError:
    """Compare `x` (any dtype) with the float64 `ref`; ulps are those of `dtype` (default x.dtype)."""
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: got {tuple(x.shape)}, oracle {tuple(ref.shape)}")
    dtype = dtype or x.dtype
    x = x.detach().to(device=ref.device, dtype=torch.float64)
    ref = ref.detach().to(torch.float64)
    fx, fr = torch.isfinite(x), torch.isfinite(ref)
    both_inf = ~fx & ~fr
    same_inf = both_inf & (x == ref)
    both = fx & fr
    diff = (x - ref)[both].abs()
    ref_norm = ref[both].norm().item()
    n = int(both.sum())
    return TensorError(
        max_abs=diff.max().item() if n else 0.0,
        p99_abs=diff.kthvalue(max(1, math.ceil(0.99 * n))).values.item() if n else 0.0,
        rel_fro=(diff.norm().item() / ref_norm) if ref_norm > 0 else (0.0 if diff.norm().item() == 0 else float("inf")),
        rmse=(diff.square().mean().sqrt().item()) if n else 0.0,
        max_ulp=(diff / _ulp(ref[both].abs().clamp_min(ULP_FLOOR * ref_norm / math.sqrt(n)), dtype)).max().item()
        if n else 0.0,
        kernel_nonfinite=int((~fx & fr).sum()),
        oracle_nonfinite=int((fx & ~fr).sum()),
        mismatched_inf=int((both_inf & ~same_inf).sum()),
        numel=x.numel(),
    )


def unwritten(out: torch.Tensor, poison: float = float("nan")) -> int:
    """Elements still holding the poison value a caller filled the buffer with before the call."""
    if poison != poison:
        return int(torch.isnan(out).sum())
    return int((out == poison).sum())
