"""flashverify.kernels.sdpa follows torch.nn.functional.scaled_dot_product_attention's semantics."""

import pytest
import torch
import torch.nn.functional as F

from flashverify.case import Case
from flashverify.evaluate import Outputs, evaluate
from flashverify.kernels import attention, sdpa


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"scale": 0.3}, {"mask": "bool"}, {"mask": "additive"}],
                         ids=["plain", "causal", "scale", "bool-mask", "additive-mask"])
def test_same_semantics_as_torch(kwargs, device):
    case = Case(seqlen_q=24, seqlen_k=40, dtype="float32", mask=kwargs.get("mask"), causal=kwargs.get("is_causal", False),
                scale=kwargs.get("scale"))
    x = case.inputs(device)
    call = dict(attn_mask=x.attn_mask, is_causal=case.causal, scale=case.scale)
    ours = sdpa(x.q, x.k, x.v, **call)
    assert_passes = [r for c in evaluate(case, x, Outputs(o=ours)) for r in c.failures]
    assert not assert_passes, assert_passes
    theirs = F.scaled_dot_product_attention(x.q, x.k, x.v, **call)
    finite = torch.isfinite(theirs)  # torch gives NaN on fully masked rows, we give 0
    # both within their bounds of the oracle; between each other, a few float32 roundings
    assert torch.allclose(ours[finite], theirs[finite], rtol=1e-5, atol=1e-6)


def test_gqa_and_equivalence(device):
    x = Case(heads_q=4, heads_kv=2, seqlen_q=16, seqlen_k=16).inputs(device)
    assert torch.equal(sdpa(x.q, x.k, x.v, is_causal=True, enable_gqa=True), attention(x.q, x.k, x.v, causal=True))


def test_dropout_reproducible_with_manual_seed(device):
    x = Case(seqlen_q=16, seqlen_k=16).inputs(device)
    torch.manual_seed(5)
    a = sdpa(x.q, x.k, x.v, dropout_p=0.5)
    torch.manual_seed(5)
    b = sdpa(x.q, x.k, x.v, dropout_p=0.5)
    assert torch.equal(a, b)
