"""The two oracles certify each other; the float64 backward formulas match autograd."""

import math

import pytest
import torch

from flashverify import oracles
from flashverify.bounds import Precision, backward_bounds, forward_bounds
from flashverify.case import Case
from flashverify.impls import BUNDLED
from flashverify.mp_oracle import MpOracle, sample

CASES = {
    "random": Case(heads_q=2, heads_kv=1, seqlen_q=24, seqlen_k=40, head_dim=32, causal=True),
    "large-logits": Case(seqlen_q=16, seqlen_k=48, head_dim=32, distribution="large_logits", scale=1.0),
    "one-hot": Case(seqlen_q=16, seqlen_k=32, head_dim=16, distribution="one_hot", dtype="bfloat16"),
    "masked-rows": Case(batch=2, seqlen_q=16, seqlen_k=24, head_dim=16, key_lengths=(0, 9), mask="additive"),
    "dropout-fp32": Case(seqlen_q=16, seqlen_k=24, head_dim=16, dropout_p=0.4, seed=3, dtype="float32"),
    # rows 3 and 4 have -inf on their only key (found by the release profile: mpmath took exp(nan))
    "additive-inf-only-key": Case(seqlen_q=5, seqlen_k=1, head_dim=24, mask="additive"),
}


def _delta_cancelling(case):
    """dO rows nearly orthogonal to every V row's deviation from the mean: dP_ij ~ delta_i."""
    x = case.inputs()
    v = x.v.double()
    vbar = v.mean(2, keepdim=True)
    do = x.do.double()
    basis = (v - vbar).flatten(0, 2)                       # remove the span of the deviations
    proj = torch.linalg.lstsq(basis.T, do.flatten(0, 2).T).solution
    do = (do.flatten(0, 2) - (basis.T @ proj).T).view_as(do) + 1e-3 * do
    return type(x)(**{**x.__dict__, "do": do.to(x.do.dtype)})


def _f64_and_mp(case, inputs):
    keep = BUNDLED.keep_mask(case, "cpu")
    m = case.masking(inputs)
    fwd = oracles.forward(inputs.q, inputs.k, inputs.v, m, case.scale, keep, case.dropout_p)
    grads = oracles.backward(inputs.q, inputs.k, inputs.v, inputs.do, m, case.scale, keep, case.dropout_p, fwd)
    mp = MpOracle(inputs.q, inputs.k, inputs.v, inputs.do, m, case.scale, keep, case.dropout_p)
    return fwd, grads, mp, m, keep


@pytest.mark.parametrize("name", list(CASES) + ["delta-cancelling"])
def test_float64_agrees_with_mpmath_within_its_bound(name):
    case = CASES.get(name) or Case(seqlen_q=12, seqlen_k=20, head_dim=8, dtype="float32")
    inputs = _delta_cancelling(case) if name == "delta-cancelling" else case.inputs()
    fwd, grads, mp, masking, keep = _f64_and_mp(case, inputs)
    f64 = Precision("float64", accumulate="float64")
    o_b, lse_b, es = forward_bounds(inputs.q, inputs.k, inputs.v, fwd, masking, case.softmax_scale, keep,
                                    case.dropout_p, f64)
    dq_b, dk_b, dv_b = backward_bounds(inputs.q, inputs.k, inputs.v, inputs.do, fwd, grads, masking,
                                       case.softmax_scale, keep, case.dropout_p, f64, o_b, lse_b, es)
    rows = [(b, h, i) for b in range(case.batch) for h in range(case.heads_q) for i in range(case.seqlen_q)]
    cols = [(b, hk, j) for b in range(case.batch) for hk in range(case.heads_kv) for j in range(case.seqlen_k)]
    got = sample(mp, rows, cols, o=fwd.o, lse=fwd.lse, dq=grads.dq, dk=grads.dk, dv=grads.dv)
    bound_at = {"o": o_b, "lse": lse_b, "dq": dq_b, "dk": dk_b, "dv": dv_b}
    for t, (f64_vals, exact) in got.items():
        b = bound_at[t]
        b = torch.cat([b[r].reshape(-1) for r in (rows if t in ("o", "lse", "dq") else cols)])
        same_inf = torch.isinf(exact) & (f64_vals == exact)
        err = torch.where(same_inf, 0.0, (f64_vals - exact).abs())
        assert not torch.isnan(err).any(), t
        assert (err <= b).all(), f"{t}: float64 oracle off by {err.max():.3g}, bound {b[err.argmax()]:.3g}"
        finite = torch.isfinite(exact)
        norm = exact[finite].norm()
        if norm > 0:  # the stated residual: ~1e-13 relative or better
            assert err[finite].norm() / norm < 1e-13, t


@pytest.mark.parametrize("case", [
    Case(heads_q=4, heads_kv=2, seqlen_q=12, seqlen_k=20, head_dim=8, dtype="float32", causal=True,
         causal_alignment="bottom_right", mask="additive"),
    Case(batch=2, seqlen_q=12, seqlen_k=20, head_dim=8, dtype="float32", window=(3, 2), key_lengths=(5, 20)),
    Case(seqlen_q=12, seqlen_k=20, head_dim=8, dtype="float32", dropout_p=0.3, seed=4, mask="bool"),
], ids=["gqa-causal-additive", "window-padding", "dropout-bool"])
def test_float64_backward_formulas_match_autograd(case):
    x = case.inputs()
    keep = BUNDLED.keep_mask(case, "cpu")
    m = case.masking(x)
    q, k, v = (t.detach().double().requires_grad_() for t in (x.q, x.k, x.v))
    fwd = oracles.forward(q, k, v, m, case.scale, keep, case.dropout_p)
    # autograd through the same float64 forward, re-expressed with differentiable ops
    kk = k.repeat_interleave(case.heads_q // case.heads_kv, dim=1)
    vv = v.repeat_interleave(case.heads_q // case.heads_kv, dim=1)
    allowed, bias = m.allowed_and_bias(case.batch, case.heads_q, case.seqlen_q, case.seqlen_k)
    s = q @ kk.transpose(-1, -2) * case.softmax_scale + (0 if bias is None else bias)
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    z = 1.0 if keep is None else keep.double() / (1 - case.dropout_p)
    o = (p * z) @ vv
    o.backward(x.do.double())
    g = oracles.backward(x.q, x.k, x.v, x.do, m, case.scale, keep, case.dropout_p)
    assert torch.allclose(o, fwd.o, rtol=1e-13, atol=1e-15)
    for name, auto in (("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.allclose(getattr(g, name), auto, rtol=1e-12, atol=1e-14), name


def test_mp_oracle_fully_masked_row():
    case = Case(batch=2, seqlen_q=4, seqlen_k=6, head_dim=8, key_lengths=(0, 6))
    x = case.inputs()
    mp = MpOracle(x.q, x.k, x.v, x.do, case.masking(x))
    r = mp.row(0, 0, 1)
    assert r.lse == mp.ctx.ninf and all(v == 0 for v in r.o) and all(v == 0 for v in r.dq)
    c = mp.column(0, 0, 2)
    assert all(v == 0 for v in c.dk + c.dv)


def test_mp_oracle_precision_is_configurable():
    x = Case(seqlen_q=2, seqlen_k=5, head_dim=4).inputs()
    lo, hi = MpOracle(x.q, x.k, x.v, prec=60), MpOracle(x.q, x.k, x.v, prec=300)
    diff = abs(lo.row(0, 0, 0).lse - hi.row(0, 0, 0).lse)
    assert 0 < diff < 2.0**-50


def test_a_wrong_float64_oracle_is_caught_by_mpmath(monkeypatch, device):
    """evaluate_against_mpmath holds the float64 oracle to mpmath too: an oracle off by one part in
    1e9 (far below any kernel's error, far above float64's) is reported, the kernel's checks are not."""
    import dataclasses

    from flashverify import evaluate as ev
    case = Case(seqlen_q=12, seqlen_k=20, head_dim=16, causal=True)
    x = case.inputs(device)
    out = BUNDLED.run(case, x, backward=True)
    _, oracle_checks = ev.evaluate_against_mpmath(case, x, out)
    assert all(c.passed for c in oracle_checks)
    right = oracles.forward
    monkeypatch.setattr(ev.oracles, "forward", lambda *a, **kw: dataclasses.replace(right(*a, **kw),
                                                                                     o=right(*a, **kw).o * (1 + 1e-9)))
    checks, oracle_checks = ev.evaluate_against_mpmath(case, x, out)
    assert "o" in [c.tensor for c in oracle_checks if not c.passed]   # (and dQ, through delta = rowsum(dO o O))
    assert all(c.passed for c in checks)
