"""Hold one implementation's outputs for a :class:`Case` against the oracles and bounds."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from . import oracles
from .bounds import (REFERENCE_RATIO, UNRESOLVED_NAIVE_ERROR, Check, Precision, backward_bounds, bound_ratio,
                     forward_bounds)
from .case import Case, Inputs
from .metrics import tensor_error
from .naive import naive_attention


@dataclass
class Outputs:
    """What an implementation returned; None where it does not provide the tensor."""
    o: torch.Tensor
    lse: torch.Tensor | None = None
    dq: torch.Tensor | None = None
    dk: torch.Tensor | None = None
    dv: torch.Tensor | None = None


@contextlib.contextmanager
def _cuda_tf32(enabled: bool):
    """Let torch's float32 matmuls use tf32 exactly when the kernel under test did."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _naive_errors(case, inputs, masking, keep, fwd, grads, want_grads, tf32):
    """Relative Frobenius errors of the naive attention in the same low precision, per tensor."""
    q, k, v = (t.detach().clone().requires_grad_(want_grads) for t in (inputs.q, inputs.k, inputs.v))
    with _cuda_tf32(tf32):
        o = naive_attention(q, k, v, masking, case.softmax_scale, keep, case.dropout_p)
        if want_grads:
            o.backward(inputs.do)
    out = {"o": tensor_error(o, fwd.o).rel_fro}
    if want_grads:
        for name, t in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
            out[name] = tensor_error(t, getattr(grads, name)).rel_fro
    return out


def _rounding_floor(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """Relative error of rounding the exact answer to the output dtype: no kernel does better."""
    return tensor_error(ref.to(dtype), ref).rel_fro


def output_bound(case: Case, inputs: Inputs, keep=None, tf32: bool = False) -> torch.Tensor:
    """The a-priori elementwise bound on |O - O_exact| (for metamorphic checks between two runs)."""
    masking = case.masking(inputs)
    fwd = oracles.forward(inputs.q, inputs.k, inputs.v, masking, case.softmax_scale, keep, case.dropout_p)
    o_bound, _, _ = forward_bounds(inputs.q, inputs.k, inputs.v, fwd, masking, case.softmax_scale, keep,
                                   case.dropout_p, Precision(case.dtype, tf32=tf32))
    return o_bound


def _require_keep(case: Case, keep) -> None:
    if case.dropout_p > 0 and keep is None:
        raise ValueError("keep must be the implementation's dropout keep-mask when case.dropout_p > 0")


def evaluate(case: Case, inputs: Inputs, out: Outputs, keep: torch.Tensor | None = None,
             tf32: bool = False) -> list[Check]:
    """One :class:`Check` per tensor the implementation returned.

    `keep` is the dropout keep-mask the implementation used (required when dropout_p > 0).
    """
    _require_keep(case, keep)
    masking = case.masking(inputs)
    scale = case.softmax_scale
    fwd = oracles.forward(inputs.q, inputs.k, inputs.v, masking, scale, keep, case.dropout_p)
    want_grads = out.dq is not None
    grads = (oracles.backward(inputs.q, inputs.k, inputs.v, inputs.do, masking, scale, keep, case.dropout_p, fwd)
             if want_grads else None)
    precision = Precision(case.dtype, tf32=tf32)
    o_b, lse_b, es = forward_bounds(inputs.q, inputs.k, inputs.v, fwd, masking, scale, keep, case.dropout_p,
                                    precision)
    naive = _naive_errors(case, inputs, masking, keep, fwd, grads, want_grads, tf32)
    if want_grads:
        # FlashAttention-2's delta = rowsum(dO o O) is formed from the implementation's own stored
        # O, so its forward error (already judged on O) reaches the gradients through delta:
        # floor the naive error by exactly that inherited error (float64 backward, delta from out.o).
        stored_o = out.o.detach().to(device=fwd.o.device, dtype=torch.float64)
        stored_o = torch.where(torch.isfinite(stored_o), stored_o, fwd.o.to(case.torch_dtype).to(torch.float64))
        via_rounded_o = oracles.backward(inputs.q, inputs.k, inputs.v, inputs.do, masking, scale, keep,
                                         case.dropout_p, dataclasses.replace(fwd, o=stored_o))
        for name in ("dq", "dk", "dv"):
            delta_floor = tensor_error(getattr(via_rounded_o, name), getattr(grads, name)).rel_fro
            naive[name] = max(naive[name], delta_floor)
    dt = case.torch_dtype
    ratio_judged = case.dtype != "float32" or tf32  # why: the comment on bounds.REFERENCE_RATIO
    checks = [_check("o", out.o, fwd.o, o_b, dt, naive, ratio_judged)]
    if out.lse is not None:
        checks.append(_check("lse", out.lse, fwd.lse, lse_b, torch.float32, None, False))
    if want_grads:
        bounds = backward_bounds(inputs.q, inputs.k, inputs.v, inputs.do, fwd, grads, masking, scale, keep,
                                 case.dropout_p, precision, o_b, lse_b, es)
        for name, b in zip(("dq", "dk", "dv"), bounds):
            checks.append(_check(name, getattr(out, name), getattr(grads, name), b, dt, naive, ratio_judged))
    return checks


def _check(name, x, ref, bound, dtype, naive, ratio_judged):
    if x.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(ref.shape)}")
    reference = None
    both = torch.isfinite(ref) & torch.isfinite(bound)
    # relative errors mean nothing for a tensor that cancels to below its own rounding noise (dQ of
    # identical keys is exactly 0; float64 leaves ~1e-24): there the a-priori bound judges alone
    above_noise = ref[both].norm() > bound[both].norm()
    resolved = (bool(above_noise) and naive is not None and naive[name] < UNRESOLVED_NAIVE_ERROR)
    if resolved:
        reference = max(naive[name], _rounding_floor(ref, dtype))
    return Check(tensor=name, error=tensor_error(x, ref, dtype), bound_ratio=bound_ratio(x, ref, bound),
                 reference_error=reference,
                 reference_limit=REFERENCE_RATIO[name] if (reference is not None and ratio_judged) else None)


def sampled_positions(case: Case, rows: int = 2, columns: int = 1):
    """Query rows (b, h, i) and key columns (b, hk, j) to check against mpmath: the last row and
    column (edge tiles), and others drawn from a generator seeded by the case (replayable)."""
    g = torch.Generator().manual_seed(case.seed)

    def pick(n):
        return int(torch.randint(n, (1,), generator=g))
    row_list = [(case.batch - 1, case.heads_q - 1, case.seqlen_q - 1)]
    row_list += [(pick(case.batch), pick(case.heads_q), pick(case.seqlen_q)) for _ in range(rows - 1)]
    col_list = [(case.batch - 1, case.heads_kv - 1, case.seqlen_k - 1)]
    col_list += [(pick(case.batch), pick(case.heads_kv), pick(case.seqlen_k)) for _ in range(columns - 1)]
    return sorted(set(row_list)), sorted(set(col_list))


def evaluate_against_mpmath(case: Case, inputs: Inputs, out: Outputs, keep: torch.Tensor | None = None,
                            tf32: bool = False) -> tuple[list[Check], list[Check]]:
    """The implementation's outputs at sampled rows (O, LSE, dQ) and columns (dK, dV) against the
    arbitrary-precision oracle and the a-priori bound; and the float64 oracle (which every other
    check trusts) against the same exact values and its own float64 bound.

    Returns (implementation checks, float64-oracle checks); mpmath is slow, so keep problems small.
    """
    from .mp_oracle import MpOracle, sample

    _require_keep(case, keep)
    on_cpu = {}
    for f in dataclasses.fields(inputs):   # mpmath works on the CPU: so do its float64 twin and the bounds
        t = getattr(inputs, f.name)
        on_cpu[f.name] = t.detach().cpu() if isinstance(t, torch.Tensor) else t
    cpu = Inputs(**on_cpu)
    keep = None if keep is None else keep.cpu()
    masking, scale = case.masking(cpu), case.softmax_scale
    want_grads = out.dq is not None
    fwd = oracles.forward(cpu.q, cpu.k, cpu.v, masking, scale, keep, case.dropout_p)
    grads = (oracles.backward(cpu.q, cpu.k, cpu.v, cpu.do, masking, scale, keep, case.dropout_p, fwd)
             if want_grads else None)
    bounds = {}
    for who, precision in (("impl", Precision(case.dtype, tf32=tf32)), ("f64", Precision("float64",
                                                                                          accumulate="float64"))):
        o_b, lse_b, es = forward_bounds(cpu.q, cpu.k, cpu.v, fwd, masking, scale, keep, case.dropout_p, precision)
        bounds[who] = {"o": o_b, "lse": lse_b}
        if want_grads:
            bounds[who].update(zip(("dq", "dk", "dv"), backward_bounds(
                cpu.q, cpu.k, cpu.v, cpu.do, fwd, grads, masking, scale, keep, case.dropout_p, precision,
                o_b, lse_b, es)))
    rows, columns = sampled_positions(case)
    mp = MpOracle(cpu.q, cpu.k, cpu.v, cpu.do if want_grads else None, masking, scale, keep, case.dropout_p)
    given = {name: getattr(out, name) for name in ("o", "lse", "dq", "dk", "dv") if getattr(out, name) is not None}
    oracle = {"o": fwd.o, "lse": fwd.lse, **({"dq": grads.dq, "dk": grads.dk, "dv": grads.dv} if want_grads else {})}

    def at(t, name):
        return torch.cat([t[p].reshape(-1) for p in (rows if name in ("o", "lse", "dq") else columns)])

    def checks(tensors, who, dtype_of):
        got = sample(mp, rows, columns, **tensors)
        return [Check(tensor=name, error=tensor_error(x, exact, dtype_of(name)),
                      bound_ratio=bound_ratio(x, exact, at(bounds[who][name], name)),
                      reference_error=None, reference_limit=None)
                for name, (x, exact) in got.items()]

    dt = case.torch_dtype
    return (checks(given, "impl", lambda name: torch.float32 if name == "lse" else dt),
            checks({k: v for k, v in oracle.items() if k in given}, "f64", lambda name: torch.float64))
