"""The a-priori bound holds for the bundled kernel (tests/test_kernel.py) and fails for
deliberately degraded computations: each must be caught by bounds.judge."""

import math

import torch

from flashverify import bounds, oracles
from flashverify.case import Case
from flashverify.evaluate import Outputs, evaluate


def _softmax_rows(s):
    return torch.softmax(s.float(), -1)


def pv_accumulated_in_bf16(q, k, v, scale, block=16):
    """fp32 scores and softmax, but the P.V sum kept in a bf16 accumulator, block by block."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    p = _softmax_rows(s).to(q.dtype)
    acc = torch.zeros(q.shape, dtype=torch.bfloat16)
    for j in range(0, k.shape[2], block):
        acc = (acc.float() + p[..., j:j + block].float() @ v[..., j:j + block, :].float()).to(torch.bfloat16)
    return acc.to(q.dtype)


def softmax_without_max_subtraction(q, k, v, scale):
    """exp(s) / sum exp(s) in float32 with no running max: overflows at large logits."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    e = torch.exp(s)
    return ((e / e.sum(-1, keepdim=True)).to(q.dtype).float() @ v.float()).to(q.dtype)


def scores_rounded_to_input_dtype(q, k, v, scale):
    """S rounded to fp16 before the softmax (as naive half-precision code does)."""
    s = ((q.float() @ k.float().transpose(-1, -2)) * scale).to(q.dtype)
    return (_softmax_rows(s).to(q.dtype).float() @ v.float()).to(q.dtype)


def o_checks(case, fn):
    x = case.inputs()
    o = fn(x.q, x.k, x.v, case.softmax_scale)
    (check,) = evaluate(case, x, Outputs(o=o))
    return check


def fp32_reference_attention(q, k, v, scale):
    """What a correct kernel does: fp32 scores/softmax, P rounded once, one final rounding."""
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    return (_softmax_rows(s).to(q.dtype).float() @ v.float()).to(q.dtype)


def test_correct_computation_passes():
    check = o_checks(Case(seqlen_q=64, seqlen_k=512, head_dim=64), fp32_reference_attention)
    assert check.passed, check.failures


def test_bf16_accumulation_breaks_the_bound():
    check = o_checks(Case(seqlen_q=64, seqlen_k=512, head_dim=64), pv_accumulated_in_bf16)
    assert any("a-priori bound" in r for r in check.failures), check.failures


def test_softmax_without_max_subtraction_overflows_and_is_caught():
    case = Case(seqlen_q=32, seqlen_k=64, head_dim=64, distribution="large_logits", scale=1.0)
    check = o_checks(case, softmax_without_max_subtraction)
    assert any("NaN/Inf where the oracle is finite" in r for r in check.failures), check.failures


def test_scores_in_fp16_exceed_the_flash_bound():
    """The naive fp16 recipe is less accurate than blockwise attention may be: the bound says so."""
    check = o_checks(Case(seqlen_q=64, seqlen_k=256, head_dim=64, distribution="large_logits", scale=0.5),
                     scores_rounded_to_input_dtype)
    assert check.bound_ratio > 1, check


def test_reference_ratio_catches_a_2x_worse_kernel():
    """Doubling the error of a correct result: within the a-priori bound, beyond 2x naive? It must
    at least be reported as a ratio; an added 4-ulp perturbation must fail the reference check."""
    case = Case(seqlen_q=64, seqlen_k=256, head_dim=64)
    x = case.inputs()
    good = fp32_reference_attention(x.q, x.k, x.v, case.softmax_scale)
    noise = torch.randn(good.shape, generator=torch.Generator().manual_seed(1)).sign() * 4 * 2.0**-10
    bad = (good.double() * (1 + noise)).to(good.dtype)
    (check,) = evaluate(case, x, Outputs(o=bad))
    assert check.reference_ratio > bounds.FORWARD_REFERENCE_RATIO
    assert not check.passed


def test_gamma_and_unit_roundoffs():
    assert bounds.UNIT_ROUNDOFF["float16"] == 2.0**-11
    assert bounds.UNIT_ROUNDOFF["bfloat16"] == 2.0**-8
    assert bounds.UNIT_ROUNDOFF["float8_e4m3fn"] == 2.0**-4
    assert math.isclose(bounds.gamma(10, 2.0**-24), 10 * 2.0**-24 / (1 - 10 * 2.0**-24))
    assert bounds.gamma(2**25, 2.0**-24) == math.inf
    p16, p32 = bounds.Precision("float16"), bounds.Precision("float32")
    assert p16.dot_gamma(64) == bounds.gamma(64, 2.0**-24)   # exact fp16 products
    assert p32.dot_gamma(64) == bounds.gamma(65, 2.0**-24)   # each fp32 product rounds


def test_judge_is_the_one_rule():
    from flashverify.metrics import tensor_error
    ref = torch.ones(4, dtype=torch.float64)
    e = tensor_error(torch.tensor([1.0, 1.0, float("nan"), 1.0]), ref)
    c = bounds.Check("o", e, bound_ratio=0.5, reference_error=1e-3, reference_limit=2.0)
    assert bounds.judge(c) == ["o: 1 NaN/Inf where the oracle is finite"]
    c = bounds.Check("dq", tensor_error(torch.ones(4), ref), bound_ratio=1.5, reference_error=None,
                     reference_limit=None)
    assert bounds.judge(c) == ["dq: error is 1.5x its a-priori bound"]


def _flush(t):
    """Values below float32's smallest normal set to zero, as a GPU's ftz arithmetic does."""
    return torch.where(t.abs() < 2.0**-126, torch.zeros_like(t), t)


def flush_to_zero_attention(q, k, v, scale, keep, dropout_p):
    """A correct kernel on hardware that flushes float32/bf16 subnormals: P and O below 2^-126 are 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    l = p.sum(-1, keepdim=True)
    p = _flush(_flush(p) * keep / (1 - dropout_p)).to(q.dtype)
    return _flush((p.float() @ v.float()) / l).to(q.dtype)


def test_subnormals_flushed_to_zero_stay_within_the_bound():
    """The release profile's H100 case: the only kept key of a bf16 row has P = 3.6e-40, which the
    GPU flushes, so O is 0 where the oracle's is ~4e-39. That is correct flush-to-zero
    behaviour, and the bound must allow it (it failed 7x under a gradual-underflow model)."""
    from flashverify.kernels import dropout_mask
    case = Case(heads_kv=1, seqlen_q=65, seqlen_k=2, head_dim=16, dtype="bfloat16", dropout_p=0.1,
                distribution="underflow")
    x = case.inputs()
    keep = dropout_mask(case.seed, (case.batch, case.heads_q, case.seqlen_q, case.seqlen_k), case.dropout_p)
    o = flush_to_zero_attention(x.q, x.k, x.v, case.softmax_scale, keep, case.dropout_p)
    exact = oracles.forward(x.q, x.k, x.v, case.masking(x), case.scale, keep, case.dropout_p).o
    assert ((o == 0).all(-1) & (exact.abs().amax(-1) > 0)).any()   # a row was flushed: the hard case
    (check,) = evaluate(case, x, Outputs(o=o), keep=keep)
    assert check.passed, check.failures
    assert bounds.underflow_error("float16") == 2.0**-25   # float16 keeps its subnormals: no flush allowance
