"""Hypothesis strategies for attention problems, importable like ``hypothesis.extra.numpy``.

Everything draws plain data (a :class:`flashverify.case.Case`); tensors are built from the
case's seed, so any example replays from its printed repr on any machine::

    from hypothesis import given
    from flashverify.properties import strategies as fst

    @given(fst.cases(max_seqlen=64))
    def test_mine(case):
        x = case.inputs("cuda")
        ...
"""

from __future__ import annotations

from hypothesis import strategies as st

from flashverify.case import DISTRIBUTIONS, Case
from flashverify.impls import ALL_DTYPES, Capabilities

# Lengths that break kernels: 1, primes, and one either side of the common block sizes.
AWKWARD_LENGTHS = (1, 2, 3, 5, 7, 13, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 97, 127, 128, 129, 255, 256, 257,
                   511, 512, 513, 1023, 1024, 1025)
# Head dims kernels special-case, and ones they forget (non-powers of two).
COMMON_HEAD_DIMS = (16, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256)


def seqlens(max_seqlen: int = 128) -> st.SearchStrategy[int]:
    """Sequence lengths in [1, max_seqlen], biased to block edges and primes."""
    awkward = [n for n in AWKWARD_LENGTHS if n <= max_seqlen]
    return st.one_of(st.sampled_from(awkward), st.integers(1, max_seqlen))


def head_dims(lo: int = 1, hi: int = 256) -> st.SearchStrategy[int]:
    common = [d for d in COMMON_HEAD_DIMS if lo <= d <= hi]
    return st.one_of(st.sampled_from(common), st.integers(lo, hi)) if common else st.integers(lo, hi)


def heads(gqa: bool = True, max_kv_heads: int = 2, max_group: int = 3) -> st.SearchStrategy[tuple[int, int]]:
    """(Hq, Hkv) with Hq a multiple of Hkv; MQA (Hkv = 1) and MHA (group 1) included."""
    groups = st.integers(1, max_group) if gqa else st.just(1)
    return st.tuples(st.integers(1, max_kv_heads), groups).map(lambda t: (t[0] * t[1], t[0]))


def dtypes(allowed=ALL_DTYPES) -> st.SearchStrategy[str]:
    return st.sampled_from(list(allowed))


def distributions() -> st.SearchStrategy[str]:
    """normal, uniform, large logits, underflowing probabilities, FlashAttention-3's outlier mix,
    near one-hot, constant rows."""
    return st.sampled_from(DISTRIBUTIONS)


def windows(nq: int, nk: int) -> st.SearchStrategy[tuple]:
    side = st.one_of(st.none(), st.integers(0, max(nq, nk)))
    return st.tuples(side, side)


@st.composite
def maskings(draw, batch: int, nq: int, nk: int, capabilities: Capabilities = Capabilities()) -> dict:
    """Case fields for masking: causal (either alignment), window, key padding, bool/additive masks."""
    fields = {}
    if capabilities.causal_alignments and draw(st.booleans()):
        fields["causal"] = True
        fields["causal_alignment"] = draw(st.sampled_from(capabilities.causal_alignments))
    if capabilities.window and draw(st.integers(0, 3)) == 0:
        left, right = draw(windows(nq, nk))
        if fields.get("causal"):
            right = draw(st.sampled_from([None, 0]))
        fields["window"] = (left, right)
        fields.setdefault("causal_alignment", draw(st.sampled_from(capabilities.causal_alignments or ("top_left",))))
    if capabilities.key_lengths and draw(st.integers(0, 3)) == 0:
        fields["key_lengths"] = tuple(draw(st.lists(st.integers(0, nk), min_size=batch, max_size=batch)))
    if capabilities.masks and draw(st.integers(0, 2)) == 0:
        fields["mask"] = draw(st.sampled_from(capabilities.masks))
        fields["mask_broadcast"] = draw(st.booleans())
    return fields


@st.composite
def cases(draw, capabilities: Capabilities = Capabilities(), max_seqlen: int = 128, max_head_dim: int = 128,
          max_batch: int = 2, dropout: bool | None = None, **fixed) -> Case:
    """A whole problem within `capabilities`. `dropout`: None = maybe (only where the
    implementation can show its keep-mask), True/False = always/never. `fixed` pins any
    Case field (e.g. dtype="float32")."""
    lo, hi = capabilities.head_dims
    batch = draw(st.integers(1, max_batch))
    hq, hkv = draw(heads(capabilities.gqa))
    nq = draw(seqlens(min(max_seqlen, capabilities.max_seqlen)))
    nk = draw(seqlens(min(max_seqlen, capabilities.max_seqlen)))
    fields = dict(batch=batch, heads_q=hq, heads_kv=hkv, seqlen_q=nq, seqlen_k=nk,
                  head_dim=draw(head_dims(lo, min(hi, max_head_dim))),
                  dtype=draw(dtypes(capabilities.dtypes)), distribution=draw(distributions()),
                  seed=draw(st.integers(0, 2**31 - 1)),
                  layout=draw(st.sampled_from(("bhnd", "bnhd") if capabilities.strided_inputs else ("bhnd",))))
    fields.update(draw(maskings(batch, nq, nk, capabilities)))
    if draw(st.integers(0, 4)) == 0:
        fields["scale"] = draw(st.floats(0.01, 2.0))
    want_dropout = dropout if dropout is not None else (capabilities.keep_mask and draw(st.integers(0, 3)) == 0)
    if want_dropout and capabilities.dropout:
        fields["dropout_p"] = draw(st.sampled_from([0.1, 0.5, 0.9]))
    fields.update(fixed)
    return Case(**fields)
