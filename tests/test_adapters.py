"""Built-in adapters for torch's own kernels (SDPA backends, FlexAttention)."""

import pytest
import torch

from flashverify import BUILTIN_IMPLEMENTATIONS
from flashverify.case import Case
from flashverify.evaluate import evaluate
from flashverify.impls import Unsupported, load


@pytest.mark.parametrize("name", BUILTIN_IMPLEMENTATIONS)
def test_every_builtin_loads_here(name, device):
    impl = load(name, device=device)
    assert impl.name == name or name == "flashverify"


def test_unknown_builtin_name_is_a_clear_error():
    with pytest.raises(ValueError, match="built-in name.*sdpa-flash"):
        load("sdpa-fast")


FLEX_CASES = [  # every masking rule the adapter translates into a mask_mod / score_mod
    Case(batch=2, seqlen_q=5, seqlen_k=9, head_dim=16, dtype="float32", causal=True,
         causal_alignment="bottom_right", key_lengths=(3, 9)),
    Case(seqlen_q=7, seqlen_k=7, head_dim=16, dtype="float32", window=(2, 1)),
    Case(seqlen_q=7, seqlen_k=8, head_dim=16, dtype="float32", mask="bool", mask_broadcast=True),
    Case(batch=2, heads_q=4, heads_kv=2, seqlen_q=7, seqlen_k=8, head_dim=16, dtype="float16", mask="additive"),
    Case(batch=2, seqlen_q=6, seqlen_k=6, head_dim=16, dtype="float32", key_lengths=(0, 6)),
]


@pytest.mark.parametrize("case", FLEX_CASES, ids=repr)
def test_flex_adapter_matches_the_oracle(case, device):
    impl = load("flex", device=device)
    x = case.inputs(device)
    out = impl.run(case, x, backward=impl.capabilities.backward)
    failures = [f for c in evaluate(case, x, out) for f in c.failures]
    assert not failures


def test_flex_adapter_is_caught_when_a_mask_rule_is_dropped(device, monkeypatch):
    """The adapter test can fail: with the window rule lost, the oracle sees it."""
    from flashverify import adapters
    real = adapters._mask_mod
    monkeypatch.setattr(adapters, "_mask_mod", lambda m, nq, nk: real(
        type(m)(causal=m.causal, key_lengths=m.key_lengths, attn_mask=m.attn_mask), nq, nk))
    case = FLEX_CASES[1]
    x = case.inputs(device)
    out = load("flex", device=device).run(case, x, backward=False)
    assert any(c.failures for c in evaluate(case, x, out))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the backend exists")
def test_sdpa_backend_declining_a_case_is_unsupported_not_an_error():
    """torch's dispatcher refusing a pinned backend (constraints per shape, dtype, mask) is that
    backend declining the case; any other error stays an error."""
    q = torch.randn(1, 1, 4, 8)
    declines = load("sdpa-efficient", device="cpu")    # no efficient backend in a CPU build
    with pytest.raises(Unsupported, match="sdpa-efficient: torch declines this case"):
        declines.fn(q, q, q)
    with pytest.raises(RuntimeError) as raised:
        load("sdpa-math", device="cpu").fn(q, q, torch.randn(1, 1, 5, 8))   # k, v lengths disagree
    assert not isinstance(raised.value, Unsupported)


@pytest.mark.skipif(torch.cuda.is_available(), reason="every SDPA backend exists on a CUDA build")
def test_sdpa_backend_missing_here_is_skipped_with_the_reason(pytester):
    result = pytester.runpytest("-p", "no:cacheprovider", "--pyargs", "flashverify.properties",
                                "--attn-profile=ci", "--attn-impl=sdpa-cudnn", "-k", "forward_within", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*sdpa-cudnn runs on no dtype here*No viable backend*"])
