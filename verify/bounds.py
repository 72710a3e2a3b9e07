"""Error bounds for blockwise (FlashAttention-style) attention, and the one pass/fail rule.

Two bounds, both reported for every tensor (derivation: docs/error-model.md):

* **a priori**: a first-order, per-element running-error bound for a kernel that
  forms S = QK^T with float32 accumulation, keeps the online softmax in float32,
  rounds P (and dS) to the input dtype before the P.V (dS.K, dS^T.Q) products, and
  rounds each output once. It is computed from the float64 oracle's |P|, |V|, ...
  It is a worst-case bound: measured/bound is usually far below 1.
* **reference ratio**: the kernel's relative Frobenius error over that of the
  naive attention in the same low precision (see :mod:`flashverify.naive`), the
  criterion of FlashAttention's test suite. The naive error is floored by what no
  flash kernel can beat: rounding the float64 answer to the output dtype, and (for
  gradients) the exact effect of FlashAttention-2's delta = rowsum(dO o O) being formed
  from the implementation's own stored O.

:func:`judge` is the only place that decides pass or fail.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .metrics import TensorError

# Unit roundoff u (half the spacing at 1) of the formats attention kernels use.
UNIT_ROUNDOFF = {
    "float64": 2.0**-53,
    "float32": 2.0**-24,
    "tf32": 2.0**-11,
    "float16": 2.0**-11,
    "bfloat16": 2.0**-8,
    "float8_e4m3fn": 2.0**-4,
    "float8_e5m2": 2.0**-3,
}
# Largest absolute error of rounding a number in [0, 1] into the format's subnormal range
# (half the smallest subnormal): P and dS can be that small, where relative bounds fail.
SUBNORMAL_HALF_STEP = {"float16": 2.0**-25, "bfloat16": 2.0**-134, "float32": 2.0**-150, "float64": 2.0**-1075}
# Formats whose subnormals GPUs may flush to zero (float32 exp2.approx.ftz; bfloat16 and float32
# tensor-core operands and results): a value below the smallest normal, 2^-126, can become 0,
# an absolute error up to 2^-126 rather than half a subnormal step. float16 keeps its subnormals
# (tensor cores and conversions support them). Found by the release profile on the H100: a bf16
# row whose only kept key had P = 3.6e-40 came back 0 where the oracle's O was ~4e-39, 7x the
# gradual-underflow bound.
FLUSHED_BELOW = {"bfloat16": 2.0**-126, "float32": 2.0**-126}

# Hardware exp2 (MUFU.EX2 on NVIDIA GPUs) is accurate to about 2 ulp of float32.
EXP2_RELATIVE_ERROR = 4 * UNIT_ROUNDOFF["float32"]

# FlashAttention's suite holds its kernel to 2x the naive reference's error for the
# output and 3x for the gradients (which add a second chain of low-precision products);
# we keep those multipliers, applied per tensor.
FORWARD_REFERENCE_RATIO = 2.0
BACKWARD_REFERENCE_RATIO = 3.0
# A tensor the naive computation cannot resolve - its relative error at least this - has no
# meaningful relative error to compare (dQ with one key is exactly 0; the float64 oracle holds
# ~1e-16 of noise there): only the a-priori bound judges it. Likewise a tensor whose exact norm is
# below its a-priori bound's norm (it cancels to less than rounding noise: evaluate._check).
UNRESOLVED_NAIVE_ERROR = 0.5
# The ratio is *judged* where the naive error is dominated by low-precision operands (fp16, bf16,
# tf32) - the setting of FlashAttention's criterion. For IEEE float32 it is reported only: there
# the naive error is a few float32 roundings and small problems with cancelling dP - delta swing
# the ratio past 3x for correct FA2-style kernels (a blockwise twin: 5x on one query, two keys),
# so the a-priori bound judges alone.
REFERENCE_RATIO = {"o": FORWARD_REFERENCE_RATIO, "lse": FORWARD_REFERENCE_RATIO,
                   "dq": BACKWARD_REFERENCE_RATIO, "dk": BACKWARD_REFERENCE_RATIO,
                   "dv": BACKWARD_REFERENCE_RATIO}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def underflow_error(fmt: str) -> float:
    """Largest absolute error of rounding a number near zero into `fmt`, flushing included."""
    return max(FLUSHED_BELOW.get(fmt, 0.0), SUBNORMAL_HALF_STEP.get(fmt, 0.0))


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error of an n-term recursive sum."""
    nu = n * u
    return nu / (1.0 - nu) if nu < 1 else float("inf")


@dataclass(frozen=True)
class Precision:
    """What the kernel rounds to: inputs/P/dS/outputs in `low`, sums and softmax in `accumulate`.

    The float64 oracle itself is ``Precision("float64", accumulate="float64")``: the same
    model then bounds its residual against the mpmath oracle.
    """
    low: str                     # "float16" | "bfloat16" | "float32" | "float64"
    tf32: bool = False           # float32 dots with tf32 operands
    accumulate: str = "float32"

    @property
    def u_low(self) -> float:
        return UNIT_ROUNDOFF[self.low]

    @property
    def u_acc(self) -> float:
        return UNIT_ROUNDOFF[self.accumulate]

    @property
    def exp_error(self) -> float:
        """Relative error of exp: hardware exp2 in float32, libm (~1 ulp) in float64."""
        return EXP2_RELATIVE_ERROR if self.accumulate == "float32" else 2 * self.u_acc

    @property
    def p_floor(self) -> float:
        """Absolute error of a computed probability near underflow: exp is good to ~2 ulps, and
        in the subnormal range an ulp is the fixed subnormal step (P ~ 1e-44 in float32 has
        only a few significant bits); hardware that flushes subnormals loses P below 2^-126."""
        return 4 * SUBNORMAL_HALF_STEP[self.accumulate] + FLUSHED_BELOW.get(self.accumulate, 0.0)

    def dot_gamma(self, n: int) -> float:
        """Relative error bound of an n-term dot product of `low` operands."""
        ua = self.u_acc
        if self.low == "float32" and self.tf32:
            return 2 * UNIT_ROUNDOFF["tf32"] + gamma(n, ua)
        if UNIT_ROUNDOFF[self.low] ** 2 >= 2 * ua:  # fp16/bf16 products are exact in float32
            return gamma(n, ua)
        return gamma(n + 1, ua)  # each product rounds once


def _abs(t):
    return t.abs()


def forward_bounds(q, k, v, fwd, masking, scale, keep, dropout_p, precision: Precision):
    """Per-element bounds on |O - O_exact| (B,H,Nq,D) and |LSE - LSE_exact| (B,H,Nq)."""
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    B, H, nq, D = q.shape
    nk = k.shape[2]
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    ua, up = precision.u_acc, precision.u_low
    allowed, bias = masking.allowed_and_bias(B, H, nq, nk, q.device)
    s_abs = (q @ k.transpose(-1, -2)).abs() * scale
    ds = precision.dot_gamma(D) * ((_abs(q) @ _abs(k).transpose(-1, -2)) * scale) + 3 * ua * s_abs
    if bias is not None:
        ds = ds + 2 * ua * bias.abs().nan_to_num(posinf=0.0, neginf=0.0)
    es = torch.where(allowed, ds, 0.0).amax(-1, keepdim=True)  # worst score error of each row
    z = keep.to(torch.float64) / (1 - dropout_p) if (keep is not None and dropout_p > 0) else 1.0
    pv = (fwd.p * z) @ _abs(v)
    rel = 2 * es + 2 * precision.exp_error + up + 3 * gamma(nk, ua) + 3 * ua
    # P is rounded unnormalised (in [0, 1]) and divided by l = sum exp(s - max s) >= 1
    l_row = torch.exp(fwd.lse - torch.where(allowed, (q @ k.transpose(-1, -2)) * scale
                                            + (bias if bias is not None else 0.0), -torch.inf).amax(-1))
    l_row = torch.where(torch.isfinite(l_row), l_row, 1.0).unsqueeze(-1)
    eta = underflow_error(precision.low)
    subnormal = (eta + precision.p_floor) * ((allowed.to(torch.float64) * z) @ _abs(v)) / l_row
    o_bound = rel * pv + subnormal + up * fwd.o.abs() + eta  # final rounding, subnormals included
    lse_bound = (es.squeeze(-1) + precision.exp_error + gamma(nk, ua)
                 + 2 * ua * (fwd.lse.abs().nan_to_num(posinf=0.0, neginf=0.0) + 1))
    empty = torch.isneginf(fwd.lse)
    return o_bound.masked_fill(empty.unsqueeze(-1), 0.0), lse_bound.masked_fill(empty, 0.0), es


def backward_bounds(q, k, v, do, fwd, grads, masking, scale, keep, dropout_p, precision: Precision,
                    o_bound, lse_bound, es):
    """Heuristic per-element bounds on |dQ|, |dK|, |dV| errors (first order, see the doc)."""
    hkv = k.shape[1]
    q, k, v, do = (t.detach().to(torch.float64) for t in (q, k, v, do))
    B, H, nq, D = q.shape
    nk = k.shape[2]
    group = H // hkv
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    ua, up = precision.u_acc, precision.u_low
    eta = underflow_error(precision.low)
    z = keep.to(torch.float64) / (1 - dropout_p) if (keep is not None and dropout_p > 0) else torch.ones(())
    allowed = fwd.p > 0
    p = fwd.p
    pi = es + lse_bound.unsqueeze(-1) + precision.exp_error  # relative error of recomputed P
    # dV = (P Z)^T dO, P rounded to `low`
    dv_b = ((pi + up + gamma(nq * group, ua) + 2 * ua) * (p * z)).transpose(-1, -2) @ do.abs()
    dv_b = dv_b + (eta + precision.p_floor) * (allowed.to(torch.float64) * z).transpose(-1, -2) @ do.abs()
    # dS = P (dP - delta); dP = (dO V^T) Z; delta from the *stored* O
    dp = (do @ v.transpose(-1, -2)) * z
    delta = (do * fwd.o).sum(-1, keepdim=True)
    ddp = precision.dot_gamma(D) * (do.abs() @ v.abs().transpose(-1, -2)) * z.abs()
    ddelta = (do.abs() * (o_bound + gamma(D, ua) * fwd.o.abs())).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dds = (p * (pi * (dp - delta).abs() + ddp + ddelta) + precision.p_floor * (dp - delta).abs() * allowed
           + up * ds.abs() + eta * allowed)
    dq_b = scale * (dds @ k.abs() + gamma(nk, ua) * (ds.abs() @ k.abs())) + 2 * ua * scale * (ds.abs() @ k.abs())
    dk_b = scale * (dds.transpose(-1, -2) @ q.abs()
                    + (gamma(nq * group, ua) + 2 * ua) * (ds.abs().transpose(-1, -2) @ q.abs()))
    fold = lambda t: t.view(B, hkv, group, *t.shape[2:]).sum(2)
    dk_b, dv_b = fold(dk_b), fold(dv_b)
    rounded = lambda b, exact: b + up * exact.abs() + eta  # final rounding, subnormals included
    return rounded(dq_b, grads.dq), rounded(dk_b, grads.dk), rounded(dv_b, grads.dv)


def bound_ratio(x: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    """max |x - ref| / bound over elements where both are finite; 0/0 counts as 0."""
    x = x.detach().to(device=ref.device, dtype=torch.float64)
    finite = torch.isfinite(x) & torch.isfinite(ref)
    err = (x - ref).abs()[finite]
    b = bound[finite]
    if err.numel() == 0:
        return 0.0
    ratio = torch.where(err == 0, 0.0, err / b)
    return ratio.max().item()


@dataclass(frozen=True)
class Check:
    """The verdict on one tensor, with every number behind it."""
    tensor: str
    error: TensorError
    bound_ratio: float            # max elementwise |err| / a-priori bound; pass needs <= 1
    reference_error: float | None  # rel. Frobenius error of the naive low-precision reference (floored)
    reference_limit: float | None  # the multiplier allowed on it (None: reported, not judged)

    @property
    def reference_ratio(self) -> float | None:
        if self.reference_error is None:
            return None
        if self.reference_error == 0:
            return 0.0 if self.error.rel_fro == 0 else float("inf")
        return self.error.rel_fro / self.reference_error

    @property
    def failures(self) -> list[str]:
        return judge(self)

    @property
    def passed(self) -> bool:
        return not self.failures


def judge(check: Check) -> list[str]:
    """The pass/fail rule, used everywhere: returns the reasons a tensor fails (empty = pass)."""
    e, reasons = check.error, []
    if e.kernel_nonfinite:
        reasons.append(f"{check.tensor}: {e.kernel_nonfinite} NaN/Inf where the oracle is finite")
    if e.oracle_nonfinite:
        reasons.append(f"{check.tensor}: {e.oracle_nonfinite} finite values where the oracle is NaN/Inf")
    if e.mismatched_inf:
        reasons.append(f"{check.tensor}: {e.mismatched_inf} infinities differing from the oracle's")
    if not check.bound_ratio <= 1.0:
        reasons.append(f"{check.tensor}: error is {check.bound_ratio:.3g}x its a-priori bound")
    ratio = check.reference_ratio
    if ratio is not None and check.reference_limit is not None and not ratio <= check.reference_limit:
        reasons.append(f"{check.tensor}: relative error {e.rel_fro:.3g} is {ratio:.3g}x the naive "
                       f"{'reference'}'s {check.reference_error:.3g} (limit {check.reference_limit:g}x)")
    return reasons
