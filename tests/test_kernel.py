"""The bundled Triton kernel against the float64 oracle, feature by feature, forward and backward.

Every case must pass both error bounds of flashverify.bounds (a priori and reference
ratio, per tensor); the pass/fail rule is bounds.judge, the same one the CLI uses.
"""

import dataclasses
import importlib
import math
import os
import threading
import warnings

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from flashverify.case import Case
from flashverify.evaluate import evaluate
from flashverify.impls import BUNDLED, Bundled
from flashverify import philox
from flashverify.kernels import attention, dropout_mask
from flashverify.kernels import triton_kernels as tk

FEATURE_CASES = {
    "plain-fp16": Case(seqlen_q=37, seqlen_k=45, head_dim=40),
    "plain-bf16": Case(seqlen_q=37, seqlen_k=45, head_dim=40, dtype="bfloat16"),
    "plain-fp32": Case(seqlen_q=37, seqlen_k=45, head_dim=40, dtype="float32"),
    "n1": Case(seqlen_q=1, seqlen_k=1, head_dim=16),
    "nq1": Case(seqlen_q=1, seqlen_k=77, head_dim=32, causal=True, causal_alignment="bottom_right"),
    "d80": Case(seqlen_q=33, seqlen_k=33, head_dim=80),
    "d96-bf16": Case(seqlen_q=33, seqlen_k=40, head_dim=96, dtype="bfloat16"),
    "d8": Case(seqlen_q=20, seqlen_k=20, head_dim=8),
    "d256": Case(seqlen_q=20, seqlen_k=35, head_dim=256),
    "causal-topleft-nq>nk": Case(seqlen_q=70, seqlen_k=33, causal=True),
    "causal-topleft-nq<nk": Case(seqlen_q=33, seqlen_k=70, causal=True),
    "causal-bottomright-nq<nk": Case(seqlen_q=33, seqlen_k=70, causal=True, causal_alignment="bottom_right"),
    "causal-bottomright-nq>nk": Case(seqlen_q=70, seqlen_k=33, causal=True, causal_alignment="bottom_right",
                                     dtype="bfloat16"),
    "window": Case(seqlen_q=50, seqlen_k=50, window=(5, 3)),
    "window-left-only-causal": Case(seqlen_q=50, seqlen_k=70, window=(7, None), causal=True,
                                    causal_alignment="bottom_right"),
    "window-right-only": Case(seqlen_q=50, seqlen_k=40, window=(None, 2)),
    "key-lengths": Case(batch=3, seqlen_q=40, seqlen_k=50, key_lengths=(0, 17, 50)),
    "key-lengths-bottomright": Case(batch=2, seqlen_q=10, seqlen_k=50, key_lengths=(13, 40), causal=True,
                                    causal_alignment="bottom_right"),
    "bool-mask": Case(seqlen_q=40, seqlen_k=50, mask="bool"),
    "bool-mask-broadcast": Case(batch=2, seqlen_q=40, seqlen_k=50, mask="bool", mask_broadcast=True),
    "additive-mask": Case(seqlen_q=40, seqlen_k=50, mask="additive", dtype="float32"),
    # H100: the tuned D=128 masked dK/dV tile needs 248,064 bytes of shared memory with an additive
    # mask (found by the release profile); the launch must fall back to fewer stages
    "additive-mask-causal-d128": Case(seqlen_q=1, seqlen_k=32, head_dim=128, causal=True, mask="additive"),
    "gqa": Case(heads_q=6, heads_kv=2, seqlen_q=40, seqlen_k=36, causal=True),
    "mqa": Case(heads_q=4, heads_kv=1, seqlen_q=40, seqlen_k=36, dtype="bfloat16"),
    "dropout-fp16": Case(seqlen_q=40, seqlen_k=50, dropout_p=0.3, seed=11),
    "dropout-fp32-gqa-causal": Case(heads_q=4, heads_kv=2, seqlen_q=40, seqlen_k=50, dropout_p=0.5, seed=3,
                                    causal=True, dtype="float32"),
    "scale": Case(seqlen_q=40, seqlen_k=40, scale=0.37),
    "bnhd-layout": Case(seqlen_q=33, seqlen_k=20, layout="bnhd"),
    "large-logits": Case(seqlen_q=40, seqlen_k=50, distribution="large_logits"),
    "outliers": Case(seqlen_q=40, seqlen_k=50, distribution="outliers", dtype="bfloat16"),
}


def assert_passes(checks):
    failures = [reason for c in checks for reason in c.failures]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("blocks", [None, (128, 64), (64, 128)], ids=["default-tiles", "128x64", "64x128"])
@pytest.mark.parametrize("case", FEATURE_CASES.values(), ids=FEATURE_CASES.keys())
def test_matches_float64_oracle(case, blocks, device):
    """Each feature on the platform's tiles, and on the GPU's largest, where most cases fit in one
    or two tiles with rows and keys past the sequence's end: the interpreter's 32x32 tiles run
    many blocks but rarely that, which the GPU's property suite once found broken (that case:
    test_query_tiles_longer_than_the_keys, Nk a multiple of the key tile, which none of these has)."""
    inputs = case.inputs(device)
    out = (Bundled(blocks=blocks) if blocks else BUNDLED).run(case, inputs)
    assert_passes(evaluate(case, inputs, out, keep=BUNDLED.keep_mask(case, device)))


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16)])
def test_edge_tiles(blocks, device):
    """Lengths that are not multiples of either block, with masking crossing tile borders."""
    case = Case(seqlen_q=41, seqlen_k=23, causal=True, causal_alignment="bottom_right", window=(9, None))
    inputs = case.inputs(device)
    out = Bundled(blocks=blocks).run(case, inputs)
    assert_passes(evaluate(case, inputs, out))


@pytest.mark.parametrize("case", [
    Case(seqlen_q=1, seqlen_k=1, head_dim=16, seed=3333, distribution="underflow"),
    Case(heads_q=2, heads_kv=2, seqlen_q=1, seqlen_k=1, head_dim=16, dropout_p=0.1, seed=0, distribution="large_logits"),
], ids=["underflow", "large-logits-dropout"])
def test_lanes_past_the_edge_raise_no_numpy_warning(case, device):
    """One query and one key in a whole tile, with large scores: the lanes past the edge overflow in
    exp and casts and are never stored. The property suite's CI run warned of them ("overflow
    encountered in cast"); a user's test run with warnings as errors must not fail on them."""
    inputs = case.inputs(device)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = BUNDLED.run(case, inputs)
    assert_passes(evaluate(case, inputs, out, keep=BUNDLED.keep_mask(case, device)))


@pytest.mark.parametrize("case, blocks", [
    (Case(seqlen_q=1, seqlen_k=32, head_dim=16, dtype="float32", scale=1.0), (64, 32)),
    (Case(seqlen_q=1, seqlen_k=32, head_dim=16, scale=1.0, dropout_p=0.1, seed=4), (128, 32)),
    (Case(seqlen_q=3, seqlen_k=64, causal_alignment="bottom_right", dtype="bfloat16"), (128, 64)),
], ids=["fp32-64x32", "fp16-dropout-128x32", "bf16-bottom-right-128x64"])
def test_query_tiles_longer_than_the_keys(case, blocks, device):
    """No window, Nk a multiple of the key tile, and a query tile longer than the keys (the GPU's
    64- and 128-row tiles on short sequences). Every block is then interior, and the kernels skip
    the edge loops; the GPU's thorough profile found the forward and dQ doing no work at all there
    (O = 0), since the block split counts the tile's rows past Nq against the window."""
    inputs = case.inputs(device)
    out = Bundled(blocks=blocks).run(case, inputs)
    assert_passes(evaluate(case, inputs, out, keep=BUNDLED.keep_mask(case, device)))


def test_tf32_is_opt_in(device):
    """float32 dots are IEEE by default; asking for tf32 is judged against tf32's unit roundoff."""
    case = Case(seqlen_q=40, seqlen_k=40, dtype="float32")
    inputs = case.inputs(device)
    ieee = BUNDLED.run(case, inputs)
    assert_passes(evaluate(case, inputs, ieee))
    tf32 = Bundled(allow_tf32=True).run(case, inputs)
    assert_passes(evaluate(case, inputs, tf32, tf32=True))


def test_fully_masked_rows_are_zero_not_nan(device):
    """Rows with no allowed key: O = 0, LSE = -inf, zero gradients, and no NaN anywhere."""
    case = Case(batch=2, seqlen_q=40, seqlen_k=30, key_lengths=(0, 30), mask="bool")
    inputs = case.inputs(device)
    mask = inputs.attn_mask.clone()
    mask[1, :, 5:9, :] = False  # a few fully masked rows in the second batch entry too
    inputs = type(inputs)(**{**inputs.__dict__, "attn_mask": mask})
    out = BUNDLED.run(case, inputs)
    for t in (out.o, out.dq, out.dk, out.dv):
        assert not torch.isnan(t).any()
    assert (out.o[0] == 0).all() and torch.isneginf(out.lse[0]).all()
    assert (out.o[1, :, 5:9] == 0).all() and torch.isneginf(out.lse[1, :, 5:9]).all()
    assert (out.dq[0] == 0).all() and (out.dk[0] == 0).all() and (out.dv[0] == 0).all()
    assert (out.dq[1, :, 5:9] == 0).all()
    assert_passes(evaluate(case, inputs, out))


def test_bf16_outputs_round_to_nearest(device):
    """With one key and dropout, O = V / (1 - p) in float32 and dV = sum_i bf16(1 / (1 - p)) dO_i
    (P is rounded to bf16 before the product): the only rounding left is the store to bf16,
    which must be round-to-nearest (Triton's interpreter truncates unless told otherwise)."""
    case = Case(heads_q=4, heads_kv=4, seqlen_q=64, seqlen_k=1, head_dim=64, dtype="bfloat16", dropout_p=0.3, seed=9)
    x = case.inputs(device)
    out = BUNDLED.run(case, x)
    keep = BUNDLED.keep_mask(case, device).to(torch.float64)  # (B, H, Nq, 1)
    expected_o = (keep * x.v.double() / 0.7).to(torch.bfloat16)
    p_rounded = torch.tensor(1 / 0.7).to(torch.bfloat16).double()
    expected_dv = (keep * x.do.double() * p_rounded).sum(2, keepdim=True).to(torch.bfloat16)
    assert 0 < keep.mean() < 1
    assert torch.equal(out.o, expected_o)
    # dV sums 64 products in float32 before its one rounding: allow float32's own double rounding
    assert (out.dv != expected_dv).float().mean() < 0.02


def _grads(q, k, v, do, _attention=attention, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = _attention(q, k, v, **kw)
    o.backward(do)
    return o, q.grad, k.grad, v.grad


def test_deterministic_bitwise(device):
    case = Case(heads_q=4, heads_kv=2, seqlen_q=50, seqlen_k=45, causal=True)
    x = case.inputs(device)
    kw = dict(causal=True, dropout_p=0.25, seed=1234)
    first = _grads(x.q, x.k, x.v, x.do, **kw)
    second = _grads(x.q, x.k, x.v, x.do, **kw)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_dropout_seeds(device):
    x = Case(seqlen_q=40, seqlen_k=40).inputs(device)
    a = attention(x.q, x.k, x.v, dropout_p=0.3, seed=1)
    b = attention(x.q, x.k, x.v, dropout_p=0.3, seed=2)
    assert not torch.equal(a, b)
    m1, m2 = (dropout_mask(s, (1, 2, 40, 40), 0.3, device=device) for s in (1, 2))
    assert not torch.equal(m1, m2)
    assert torch.equal(m1, dropout_mask(1, (1, 2, 40, 40), 0.3, device=device))
    # keep rate: 3200 Bernoulli(0.7) draws; 5 standard deviations is ~0.04
    assert abs(m1.float().mean().item() - 0.7) < 5 * math.sqrt(0.7 * 0.3 / m1.numel())


def test_dropout_mask_matches_reference_philox(device):
    """The materialized keep-mask equals an independent numpy Philox of the documented offsets."""
    B, H, nq, nk = 2, 3, 17, 29
    mask = dropout_mask(12345, (B, H, nq, nk), 0.3, device=device).cpu().numpy()
    idx = np.meshgrid(*(np.arange(n) for n in (B, H, nq, nk)), indexing="ij")
    assert (mask == philox.keep(12345, 0.3, *idx, H, nq, nk)).all()


@triton.jit
def _probe_keep(OUT, seed, p, bh, row0, NQ, NK, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keep = tk._keep(seed, bh, (row0 + offs)[:, None], offs[None, :], NQ, NK, p)
    tl.store(OUT + offs[:, None] * BLOCK + offs[None, :], keep.to(tl.uint8))


def test_dropout_offsets_are_64_bit(device):
    """At Nq = Nk = 2**17 the offsets of head 3 pass 2**35: the kernel's keep decision there must
    equal the reference's (32-bit offsets would wrap onto head 0's and repeat its mask)."""
    n, bh, row0, block = 2**17, 3, 2**17 - 16, 16
    out = torch.empty((block, block), dtype=torch.uint8, device=device)
    _probe_keep[(1,)](out, 99, 0.5, bh, row0, n, n, BLOCK=block)
    i, j = np.meshgrid(np.arange(block) + row0, np.arange(block), indexing="ij")
    expected = philox.keep(99, 0.5, 0, bh, i, j, heads=1, seqlen_q=n, seqlen_k=n)
    assert (out.cpu().numpy().astype(bool) == expected).all()
    wrapped = philox.uniform(99, ((bh * n + i) * n + j) % 2**32) >= np.float32(0.5)
    assert (expected != wrapped).any()  # the check can tell 64-bit from wrapped offsets


TORCH_JIT_DEPRECATION = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"   # torch's own imports


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
def test_torch_compile_of_a_caller_gives_the_eager_results_in_one_graph(device):
    """Users wrap models calling attention() in torch.compile: the compiled function must give
    eager's bits, forward and backward, as one graph (fullgraph=True: the call is two opaque
    custom ops), with no warning. Traced instead, the host code broke the graph at every launch
    and dynamo warned six times (H200, session 18)."""
    x = Case(heads_q=4, heads_kv=2, seqlen_q=40, seqlen_k=36, causal=True, dropout_p=0.2, seed=5).inputs(device)
    kw = dict(causal=True, dropout_p=0.2, seed=5)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, **kw), fullgraph=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = _grads(x.q, x.k, x.v, x.do, _attention=compiled)
    finally:
        torch._dynamo.reset()
    warned = [str(w.message)[:300] for w in caught if "torch.jit.script_method" not in str(w.message)]
    assert not warned, warned
    for a, b in zip(got, _grads(x.q, x.k, x.v, x.do, **kw)):
        assert torch.equal(a, b)


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
def test_torch_compile_draws_the_dropout_seed_as_eager_and_keeps_lse_without_gradient(device):
    """seed=None draws from torch's generator inside the forward op, and the backward op gets
    that seed back: with the generator in the same state, compiled and eager calls agree. LSE
    takes no gradient in either."""
    x = Case(seqlen_q=24, seqlen_k=40, head_dim=32, dropout_p=0.3).inputs(device)
    lses = []

    def call(q, k, v):
        o, lse = attention(q, k, v, dropout_p=0.3, return_lse=True)
        lses.append(lse)
        return o
    compiled = torch.compile(call, fullgraph=True)
    try:
        torch.manual_seed(7)
        got = _grads(x.q, x.k, x.v, x.do, _attention=compiled)
    finally:
        torch._dynamo.reset()
    torch.manual_seed(7)
    want = _grads(x.q, x.k, x.v, x.do, _attention=call)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not any(lse.requires_grad for lse in lses)


@pytest.mark.filterwarnings(TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("bad", [dict(causal="yes"), dict(window=(-1, 0)), dict(dropout_p=1.5),
                                 dict(blocks=(24, 32)), dict(head_dim_k=16), dict(key_lengths=[50, 3])],
                         ids=["causal", "window", "dropout_p", "blocks", "head_dims", "key_lengths"])
def test_torch_compile_rejects_bad_arguments_as_eager_does(device, bad):
    """Under torch.compile the arguments go through a custom op's schema and fake tensors: the
    error must still be eager's, naming the argument (not a schema or fake-tensor error)."""
    x = Case(seqlen_q=40, seqlen_k=40, head_dim=32).inputs(device)
    bad = dict(bad)
    k, v = x.k, x.v
    if "head_dim_k" in bad:
        d = bad.pop("head_dim_k")
        k, v = k[..., :d], v[..., :d]
    if "key_lengths" in bad:
        bad["key_lengths"] = torch.tensor(bad["key_lengths"], device=device)
    with pytest.raises((TypeError, ValueError)) as eager:
        attention(x.q, k, v, **bad)
    compiled = torch.compile(lambda q, k, v: attention(q, k, v, **bad))
    try:
        with pytest.raises(type(eager.value)) as got:
            compiled(x.q, k, v)
    finally:
        torch._dynamo.reset()
    assert str(got.value) == str(eager.value)


def test_inputs_not_mutated(device):
    x = Case(seqlen_q=30, seqlen_k=30, mask="additive").inputs(device)
    copies = [t.clone() for t in (x.q, x.k, x.v, x.do, x.attn_mask)]
    _grads(x.q, x.k, x.v, x.do, attn_mask=x.attn_mask)
    for before, after in zip(copies, (x.q, x.k, x.v, x.do, x.attn_mask)):
        assert torch.equal(before, after)


def test_noncontiguous_and_broadcast_grad(device):
    """Transposed (B, N, H, D) views, a last-dim-strided input, and an expanded (stride-0) dO."""
    case = Case(seqlen_q=20, seqlen_k=24, head_dim=32, layout="bnhd", dtype="float32")
    x = case.inputs(device)
    q_strided = torch.stack([x.q, x.q], dim=-1)[..., 0]  # stride(-1) == 2
    assert q_strided.stride(-1) == 2
    o = attention(q_strided, x.k, x.v)
    assert torch.equal(o, attention(x.q.contiguous(), x.k.contiguous(), x.v.contiguous()))
    q = x.q.detach().clone().requires_grad_()
    attention(q, x.k, x.v).sum().backward()  # dO is an expanded scalar: all strides 0
    from flashverify import oracles
    g = oracles.backward(x.q, x.k, x.v, torch.ones(q.shape, dtype=torch.float64, device=device))
    assert torch.allclose(q.grad.double(), g.dq, rtol=0, atol=1e-5)


def test_output_shapes_and_dtypes(device):
    x = Case(heads_q=4, heads_kv=2, seqlen_q=9, seqlen_k=13, head_dim=24, dtype="bfloat16").inputs(device)
    o, lse = attention(x.q, x.k, x.v, return_lse=True)
    assert o.shape == x.q.shape and o.dtype == torch.bfloat16 and o.device == x.q.device
    assert lse.shape == (1, 4, 9) and lse.dtype == torch.float32


def test_bf16_subnormal_gradients(device):
    """Large logits push P.dO into bf16's subnormal range (dV ~ 1e-39). Triton 3.8's interpreter
    garbles bf16 subnormals in casts (dV came back 2.5x too large, 13.7x its bound); the
    kernel forms bf16 through its bits there."""
    from flashverify.case import Case
    from flashverify.evaluate import evaluate
    from flashverify.impls import BUNDLED
    case = Case(batch=2, seqlen_q=32, seqlen_k=32, head_dim=48, dtype="bfloat16", causal=True, scale=1.6129,
                distribution="large_logits")
    x = case.inputs(device)
    checks = evaluate(case, x, BUNDLED.run(case, x))
    assert not [f for c in checks for f in c.failures]


@triton.jit
def _block_ranges_kernel(OUT, NQ, nk, shift, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         KEYS: tl.constexpr):
    pid = tl.program_id(0)
    if KEYS:
        lo, mid_lo, mid_hi, hi = tk._key_blocks(pid * BLOCK_M, nk, shift, left, right, NQ, BLOCK_M, BLOCK_N)
    else:
        lo, mid_lo, mid_hi, hi = tk._query_blocks(pid * BLOCK_N, nk, shift, left, right, NQ, BLOCK_M, BLOCK_N)
    tl.store(OUT + pid * 4 + 0, lo)
    tl.store(OUT + pid * 4 + 1, mid_lo)
    tl.store(OUT + pid * 4 + 2, mid_hi)
    tl.store(OUT + pid * 4 + 3, hi)


def test_loop_split_visits_every_allowed_block_and_masks_only_edges(device):
    """The kernels skip per-score masking on 'interior' blocks (causal loop splitting): every
    score of an interior block must be allowed, and every block holding an allowed score must be
    visited. Checked by brute force against the masking rule for random shapes and windows."""
    rng = np.random.default_rng(0)
    drawn = []
    for _ in range(120):
        nq, big_nk = (int(x) for x in rng.integers(1, 90, 2))
        nk = int(rng.integers(0, big_nk + 1))
        shift = nk - nq if rng.random() < 0.5 else 0      # bottom-right or top-left alignment
        unbounded = nq + big_nk + 1
        left, right = (int(rng.choice([0, 1, 5, 17, unbounded])) for _ in range(2))
        bm, bn = (int(rng.choice([16, 32, 64, 128])) for _ in range(2))   # the interpreter's tiles and the GPU's
        drawn.append((nq, big_nk, nk, shift, left, right, bm, bn))
    # no window, every key valid, Nk a multiple of the key tile, query tiles longer than the keys
    for nq, nk, bm, bn, bottom_right in [(1, 32, 64, 32, False), (1, 32, 128, 32, True), (3, 64, 128, 64, False),
                                         (5, 64, 128, 64, True), (130, 64, 128, 32, True)]:
        unbounded = nq + nk + 1
        drawn.append((nq, nk, nk, nk - nq if bottom_right else 0, unbounded, unbounded, bm, bn))
    for nq, big_nk, nk, shift, left, right, bm, bn in drawn:
        unbounded = nq + big_nk + 1
        i = np.arange(nq)[:, None]
        j = np.arange(nk)[None, :]
        allowed = np.zeros((nq, big_nk), bool)
        allowed[:, :nk] = ((j - i - shift) >= -left) & ((j - i - shift) <= right)
        for keys in (True, False):   # key blocks per query block (forward, dQ); query blocks per key block (dK/dV)
            outer, inner = (bm, bn) if keys else (bn, bm)
            n_outer = triton.cdiv(nq if keys else big_nk, outer)
            out = torch.zeros(n_outer * 4, dtype=torch.int32, device=device)
            _block_ranges_kernel[(n_outer,)](out, nq, nk, shift, left, right, BLOCK_M=bm, BLOCK_N=bn, KEYS=keys)
            ranges = out.view(-1, 4).cpu().numpy()
            view = allowed if keys else allowed.T
            for p, (lo, mid_lo, mid_hi, hi) in enumerate(ranges):
                rows = view[p * outer:(p + 1) * outer]
                where = f"keys={keys} nq={nq} NK={big_nk} nk={nk} shift={shift} window=({left}, {right}) " \
                        f"blocks=({bm}, {bn}) outer block {p}: ranges {lo, mid_lo, mid_hi, hi}"
                assert lo <= mid_lo <= mid_hi and lo % inner == 0 and mid_lo % inner == 0, where
                visited = set(range(lo, hi, inner)) | set(range(mid_lo, mid_hi, inner))
                for start in range(0, view.shape[1], inner):
                    tile = rows[:, start:start + inner]
                    if tile.any():
                        assert start in visited, f"{where}: block {start} holds allowed scores, not visited"
                    if mid_lo <= start < mid_hi:
                        full = tile.shape[1] == inner and tile.all()
                        assert full, f"{where}: interior block {start} has disallowed scores"
                assert not (set(range(mid_lo, mid_hi, inner)) & set(range(lo, mid_lo, inner))), where
                if keys and left == right == unbounded and nk == big_nk and nk % bn == 0:
                    # nothing to mask (attention._edges is False): the forward and dQ compile no edge loops
                    assert (mid_lo, mid_hi) == (lo, hi), f"{where}: edge blocks where nothing needs masking"


def test_launch_falls_back_to_fewer_stages_where_shared_memory_runs_out(monkeypatch):
    """A tile that does not fit is launched with fewer stages (remembered for the next launch);
    one that does not fit with a single stage is an error, not a silent skip."""
    a = importlib.import_module("flashverify.kernels.attention")
    monkeypatch.setattr(a, "_STAGES_THAT_FIT", {})
    launched = []

    class Kernel:   # Triton's `kernel[grid](...)`; raises OutOfResources above `fits` stages
        def __init__(self, fits):
            self.fits = fits

        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages, **constexprs):
                launched.append(num_stages)
                if num_stages > self.fits:
                    raise a.OutOfResources(248064, 232448, "shared memory")
            return launch

    kernel = Kernel(fits=2)
    a._launch(kernel, (1,), a.Tile(64, 128, 8, 4), BLOCK_M=64)
    a._launch(kernel, (1,), a.Tile(64, 128, 8, 4), BLOCK_M=64)
    assert launched == [4, 3, 2, 2]
    with pytest.raises(a.OutOfResources):
        a._launch(Kernel(fits=0), (1,), a.Tile(64, 128, 8, 2), BLOCK_M=64)


def _jit_stand_in(BUF, n, seed, BLOCK: tl.constexpr):   # a signature for the launch-key tests below
    pass


def test_direct_launch_reuses_a_compiled_kernel_only_for_its_launch_key(monkeypatch):
    """attention._run launches through Triton once per launch key, then calls the compiled kernel's
    launcher with every argument in signature order; a change Triton specializes on (an int's value,
    a tensor's alignment or dtype, an argument's type) or a launch hook goes through Triton again."""
    a = importlib.import_module("flashverify.kernels.attention")
    kernel = triton.runtime.jit.JITFunction(_jit_stand_in, do_not_specialize=["seed"])
    compiles, launches = [], []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *launch):
            launches.append(launch)

    def through_triton(*args, grid, warmup, **kwargs):
        compiles.append((args, kwargs))
        return Compiled()

    class Driver:
        class active:
            get_current_stream = staticmethod(lambda device: f"stream of {device}")
    monkeypatch.setattr(kernel, "run", through_triton)
    monkeypatch.setattr(a, "_COMPILED", {})
    monkeypatch.setattr(a, "interpreting", lambda: False)
    monkeypatch.setattr(a, "driver", Driver)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    buf = torch.zeros(64, dtype=torch.float16)

    def run(*args, dtype_buf=buf, stream=None):
        a._run(kernel, (3, 2), (dtype_buf, *args), {"BLOCK": 64}, stream, num_warps=4)
        return len(compiles), len(launches)

    class Side:   # a torch.cuda.Stream's raw handle
        cuda_stream = "side stream"
    assert run(16, 5) == (1, 0)   # first: through Triton
    assert run(16, 5) == (1, 1)
    assert launches[-1] == (3, 2, 1, "stream of 0", "function", "metadata", None, None, None, buf, 16, 5, 64)
    assert run(16, 5, stream=Side) == (1, 2) and launches[-1][3] == "side stream"   # a stream given: no key of its own
    assert run(16, 2**20) == (1, 3)   # seed is not specialized on: its value is not in the key
    assert run(16, 2**40) == (2, 3)   # ... but its type is (i64)
    assert run(16, 2**63) == (3, 3)   # (u64)
    assert run(17, 5) == (4, 3)
    assert run(16.0, 5) == (5, 3)
    assert run(16, 5, dtype_buf=buf[1:]) == (6, 3)   # 2-byte aligned
    assert run(16, 5, dtype_buf=buf.to(torch.bfloat16)) == (7, 3)
    assert run(np.int64(16), 5) == (8, 3) and run(np.int64(16), 5) == (9, 3)   # no key for it: Triton's path, each time
    assert run(1, 5) == (10, 3) and run(True, 5) == (11, 3) and run(True, 5) == (11, 4)   # True hashes as 1
    hook = lambda metadata: None  # noqa: E731
    triton.knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert run(16, 5) == (12, 4)   # a profiler's hook: Triton's path, which calls it
    finally:
        triton.knobs.runtime.launch_enter_hook.remove(hook)
    assert run(16, 5) == (12, 5)


def test_plain_calls_reuse_the_problem_check_gave_them(monkeypatch, device):
    """attention._checked gives a plain call (no mask, key lengths, window, dropout or tile
    override) the problem _check gave the first call like it, and _check's own problem for any
    change _check reads; calls that are not plain go through _check and are not remembered."""
    a = importlib.import_module("flashverify.kernels.attention")
    monkeypatch.setattr(a, "_PLAIN_PROBLEMS", {})
    x = Case(heads_q=4, heads_kv=2, seqlen_q=40, seqlen_k=50).inputs(device)
    plain = dict(causal=False, causal_alignment="top_left", window=None, key_lengths=None, attn_mask=None,
                 scale=None, dropout_p=0.0, seed=None, allow_tf32=False, blocks=None)

    def both(q=x.q, k=x.k, v=x.v, **change):
        return a._checked(q, k, v, **(plain | change)), a._check(q, k, v, **(plain | change))
    first, checked = both()
    assert first == checked and both()[0] is first
    problems = {id(first)}
    for change in (dict(causal=True), dict(causal=True, causal_alignment="bottom_right"), dict(scale=0.5),
                   dict(allow_tf32=True), dict(dropout_p=0), dict(q=x.q[:, :, :32]), dict(k=x.k[:, :1], v=x.v[:, :1]),
                   dict(q=x.q.float(), k=x.k.float(), v=x.v.float())):
        remembered, checked = both(**change)
        assert remembered == checked and both(**change)[0] is remembered, change
        problems.add(id(remembered))
    assert len(problems) == len(a._PLAIN_PROBLEMS) == 8   # dropout_p=0 is the plain call's problem
    for change in (dict(window=(3, 0)), dict(dropout_p=0.25, seed=1), dict(blocks=(16, 16)),
                   dict(attn_mask=x.q.new_ones(40, 50, dtype=torch.bool)),
                   dict(key_lengths=torch.tensor([30], device=device))):
        assert both(**change)[0] is not both(**change)[0], change   # checked afresh each time
    assert len(a._PLAIN_PROBLEMS) == 8
    for change, error in ((dict(causal=1), TypeError), (dict(dropout_p=False), ValueError),
                          (dict(scale=True), ValueError), (dict(causal_alignment="top"), ValueError)):
        with pytest.raises(error):   # what _check rejects, also after an equal-hashing call was remembered
            a._checked(x.q, x.k, x.v, **(plain | change))


def test_every_kernel_launch_of_a_call_has_a_direct_launch_form(monkeypatch, device):
    """The launches of a forward and backward (all four kernels, with and without masks and
    dropout) pass positional arguments then exactly the kernel's constexprs, the form
    attention._run needs to call a compiled kernel itself (otherwise it silently keeps Triton's
    slower path)."""
    a = importlib.import_module("flashverify.kernels.attention")
    seen = {}
    run = a._run

    def spy(kernel, grid, args, constexprs, stream=None, **options):
        seen.setdefault(getattr(kernel, "fn", kernel).__name__, []).append((kernel, len(args), constexprs))
        return run(kernel, grid, args, constexprs, stream, **options)
    monkeypatch.setattr(a, "_run", spy)
    for case in (Case(seqlen_q=40, seqlen_k=50, causal=True),
                 Case(seqlen_q=40, seqlen_k=50, mask="additive", dropout_p=0.3, seed=4, key_lengths=(30,))):
        x = case.inputs(device)
        _grads(x.q, x.k, x.v, x.do, causal=case.causal, attn_mask=x.attn_mask, dropout_p=case.dropout_p,
               seed=case.seed, key_lengths=x.key_lengths)
    assert set(seen) == {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    for name, launches in seen.items():
        for kernel, n_args, constexprs in launches:
            jit = kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else triton.runtime.jit.JITFunction(kernel.fn)
            assert a._constexpr_tail(jit, n_args, constexprs) is not None, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="direct launches exist on a GPU only")
def test_direct_launches_give_the_results_of_tritons_launches(monkeypatch, device):
    """attention._run's direct launches (after the first of a launch key) give Triton's own bits,
    also for inputs 2 bytes off 16-byte alignment after aligned ones of the same shape: Triton
    compiles those without its aligned-load assumption, and the direct path must not reuse the
    aligned kernel for them."""
    a = importlib.import_module("flashverify.kernels.attention")
    x = Case(heads_q=4, heads_kv=2, seqlen_q=300, seqlen_k=257, head_dim=64, causal=True).inputs(device)
    kw = dict(causal=True, dropout_p=0.2, seed=5)

    def off_alignment(t):
        view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
        return view.copy_(t)

    def grads(q, k, v):   # no clone: a clone would be aligned again
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        o = attention(q, k, v, **kw)
        o.backward(x.do)
        return o, q.grad, k.grad, v.grad
    shifted = [off_alignment(t) for t in (x.q, x.k, x.v)]
    assert all(t.data_ptr() % 16 for t in shifted)
    runs = {}
    for path in ("direct", "triton"):
        if path == "triton":
            monkeypatch.setattr(a, "_direct_launch_possible", lambda kernel: None)
        grads(x.q, x.k, x.v), grads(*shifted)   # the first launches of each key go through Triton
        runs[path] = (grads(x.q, x.k, x.v), grads(*shifted))
    for inputs, direct, triton_path in zip(("aligned", "off alignment"), runs["direct"], runs["triton"]):
        for name, first, again in zip(("O", "dQ", "dK", "dV"), direct, triton_path):
            assert torch.equal(first, again), f"{name} of {inputs} inputs: direct launch differs from Triton's"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the interpreter has no pipeline stages")
def test_stages_do_not_change_results(monkeypatch, device):
    """The stage fallback of _launch is exact: every tile with 1 stage gives the tuned tile's bits."""
    a = importlib.import_module("flashverify.kernels.attention")
    case = Case(heads_q=4, heads_kv=2, seqlen_q=300, seqlen_k=257, head_dim=128, causal=True, mask="bool",
                dropout_p=0.2, seed=5)
    x = case.inputs(device)
    kw = dict(causal=True, attn_mask=x.attn_mask, dropout_p=0.2, seed=5)
    tuned = _grads(x.q, x.k, x.v, x.do, **kw)
    config = a.default_config(128, x.q.dtype, masked=True, device=x.q.device, seqlen=300)
    assert max(t.num_stages for t in (config.fwd, config.dkdv, config.dq)) > 1
    one_stage = a.LaunchConfig(*(dataclasses.replace(t, num_stages=1) for t in (config.fwd, config.dkdv, config.dq)))
    monkeypatch.setattr(a, "default_config", lambda *args, **kwargs: one_stage)
    for first, again in zip(tuned, _grads(x.q, x.k, x.v, x.do, **kw)):
        assert torch.equal(first, again)


def _with_loads(config, tma: bool):
    """`config` with every kernel's loop loading through TMA descriptors (tma) or pointers."""
    a = importlib.import_module("flashverify.kernels.attention")
    return a.LaunchConfig(*(dataclasses.replace(t, tma=tma) for t in (config.fwd, config.dkdv, config.dq)))


@pytest.mark.parametrize("case", [
    Case(heads_q=4, heads_kv=2, seqlen_q=100, seqlen_k=77, head_dim=72, causal=True, mask="bool",
         dropout_p=0.2, seed=5),
    Case(seqlen_q=64, seqlen_k=130, head_dim=64, dtype="bfloat16", layout="bnhd"),
], ids=["gqa-causal-mask-dropout-d72", "bf16-bnhd"])
def test_tma_loads_give_the_pointer_loads_results(monkeypatch, device, case):
    """Loads through TMA descriptors (attention._tma_pair) are exact: bitwise the results of the
    same tiles loading through pointers, with rows past N and columns past D (D=72 in a 128-wide
    tile) zero-filled by the descriptor where the pointer loads mask them. Fails if no kernel took
    TMA, so it cannot pass by never running that path (on a GPU without TMA it is skipped)."""
    a = importlib.import_module("flashverify.kernels.attention")
    x = case.inputs(device)
    if not a._has_tma(x.q.device):
        pytest.skip("this GPU has no TMA (sm_90 on)")
    kw = dict(causal=case.causal, attn_mask=x.attn_mask, dropout_p=case.dropout_p, seed=case.seed)
    config = a.default_config(case.head_dim, x.q.dtype, masked=case.causal, device=x.q.device,
                              seqlen=max(case.seqlen_q, case.seqlen_k))
    taken = []
    tma_rows = a._tma_rows
    monkeypatch.setattr(a, "_tma_rows", lambda *args: taken.append(tma_rows(*args)) or taken[-1])
    everywhere = _with_loads(config, tma=True)
    monkeypatch.setattr(a, "default_config", lambda *args, **kwargs: everywhere)
    with_tma = _grads(x.q, x.k, x.v, x.do, **kw)
    assert len(taken) == 6 and all(d is not None for d in taken), "every kernel should have loaded through TMA"
    nowhere = _with_loads(config, tma=False)
    monkeypatch.setattr(a, "default_config", lambda *args, **kwargs: nowhere)
    for name, first, again in zip(("O", "dQ", "dK", "dV"), with_tma, _grads(x.q, x.k, x.v, x.do, **kw)):
        assert torch.equal(first, again), f"{name}: TMA loads differ from pointer loads"


def test_table_entries_tuned_before_tma_keep_pointer_loads():
    """A tile-table entry of four values was tuned on pointer loads (the H100 table): it keeps them."""
    a = importlib.import_module("flashverify.kernels.attention")
    assert a._table_tile([64, 128, 8, 3]) == a.Tile(64, 128, 8, 3, tma=False)
    assert a._table_tile([64, 128, 8, 3, True]) == a.Tile(64, 128, 8, 3, tma=True)
    assert all(not t.tma for by_n in a.tuned_tiles("nvidia-h100-80gb-hbm3").values() for c in by_n.values()
               for t in (c.fwd, c.dkdv, c.dq))


def test_tma_only_where_the_descriptor_is_valid(device):
    """TMA takes 16-bit tensors with a 16-byte-aligned base, 16-byte-aligned nonzero strides and a
    unit last stride; anything else loads through pointers (attention._tma_rows returns None)."""
    a = importlib.import_module("flashverify.kernels.attention")
    q = torch.zeros(2, 3, 40, 64, dtype=torch.float16, device=device)
    if not a._has_tma(q.device):
        pytest.skip("this GPU has no TMA (sm_90 on)")
    assert a._tma_rows(q, 32, 64) is not None
    assert a._tma_rows(q.transpose(1, 2).contiguous().transpose(1, 2), 32, 64) is not None   # (B, N, H, D)
    refused = {
        "float32": q.float(),
        "base off 16 bytes": torch.zeros(2 * 3 * 40 * 64 + 1, dtype=torch.float16, device=device)[1:].view(2, 3, 40, 64),
        "row stride off 16 bytes": torch.zeros(2, 3, 40, 68, dtype=torch.float16, device=device)[..., :60],
        "stride 0 (expanded)": torch.zeros((), dtype=torch.float16, device=device).expand(2, 3, 40, 64),
        "last stride 2": torch.zeros(2, 3, 40, 128, dtype=torch.float16, device=device)[..., ::2],
    }
    for why, t in refused.items():
        assert a._tma_rows(t, 32, 64) is None, why


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA contexts exist on a GPU only")
def test_runs_in_a_thread_that_made_no_cuda_call(monkeypatch, device):
    """Called first thing in a fresh thread (the plugin's --attn-timeout runs each call in one), the
    kernel gives the main thread's results, with every kernel loading through TMA: Triton encodes a
    descriptor before its launcher makes a CUDA context current, which failed there with "invalid
    device context" until attention._context_current (the H200 thorough run, session 17)."""
    a = importlib.import_module("flashverify.kernels.attention")
    x = Case(seqlen_q=128, seqlen_k=96, head_dim=64, causal=True).inputs(device)
    if not a._has_tma(x.q.device):
        pytest.skip("this GPU has no TMA (sm_90 on)")
    config = a.default_config(64, x.q.dtype, masked=True, device=x.q.device, seqlen=128)
    everywhere = _with_loads(config, tma=True)
    monkeypatch.setattr(a, "default_config", lambda *args, **kwargs: everywhere)
    here = _grads(x.q, x.k, x.v, x.do, causal=True)
    q, k, v = (t.detach().clone().requires_grad_() for t in (x.q, x.k, x.v))   # no CUDA call in the thread before ours
    outcome = []

    def call():
        try:
            o = attention(q, k, v, causal=True)
            o.backward(x.do)
            outcome.append((o, q.grad, k.grad, v.grad))
        except Exception as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    worker = threading.Thread(target=call)
    worker.start()
    worker.join()
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    for name, first, again in zip(("O", "dQ", "dK", "dV"), here, outcome[0]):
        assert torch.equal(first, again), f"{name} differs in a fresh thread"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="streams exist on a GPU only")
def test_backward_on_two_streams_is_the_one_stream_backward(monkeypatch, device):
    """dQ runs on a side stream beside dK/dV (attention._backward): its results must be bitwise those
    of both kernels on one stream, also when the caller works on a stream of its own (a side stream
    that did not wait for the caller's would read the delta kernel's output before it is written)."""
    a = importlib.import_module("flashverify.kernels.attention")
    x = Case(batch=4, heads_q=8, heads_kv=8, seqlen_q=2048, seqlen_k=2048, head_dim=64).inputs(device)
    user = torch.cuda.Stream(device)
    user.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(user):
        two_streams = _grads(x.q, x.k, x.v, x.do, causal=True)
    torch.cuda.current_stream(device).wait_stream(user)
    monkeypatch.setattr(a, "_side_stream", lambda dev: torch.cuda.current_stream(dev))
    one_stream = _grads(x.q, x.k, x.v, x.do, causal=True)
    for name, first, again in zip(("O", "dQ", "dK", "dV"), two_streams, one_stream):
        assert torch.equal(first, again), f"{name} differs between two streams and one"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_tensors_device_not_the_current_one():
    """Triton launches on the current device; the kernel must switch to its tensors' (cuda:1 while
    cuda:0 is current) and give what it gives when cuda:1 is current, forward, backward, dropout mask."""
    x = Case(heads_q=4, heads_kv=2, seqlen_q=300, seqlen_k=200, head_dim=64).inputs("cuda:1")
    kw = dict(causal=True, dropout_p=0.2, seed=7)
    with torch.cuda.device(0):
        elsewhere = _grads(x.q, x.k, x.v, x.do, **kw)
        mask_elsewhere = dropout_mask(7, (1, 4, 300, 200), 0.2, device="cuda:1")
    with torch.cuda.device(1):
        here = _grads(x.q, x.k, x.v, x.do, **kw)
        mask_here = dropout_mask(7, (1, 4, 300, 200), 0.2, device="cuda:1")
    for name, a, b in zip(("O", "dQ", "dK", "dV"), elsewhere, here):
        assert a.device == torch.device("cuda:1") and torch.equal(a, b), name
    assert torch.equal(mask_elsewhere, mask_here)


def test_tile_table_of_each_gpu_parses():
    """Every committed tile table (benchmarks/tune.py) has the schema and all three kernels."""
    a = importlib.import_module("flashverify.kernels.attention")   # the package re-exports a function by that name
    slugs = [f[:-5] for f in os.listdir(a.TILES_DIR) if f.endswith(".json")]
    assert slugs, "no tile table committed"
    for slug in slugs:
        table = a.tuned_tiles(slug)
        assert table and all(by_n and all(isinstance(c, a.LaunchConfig) for c in by_n.values())
                             for by_n in table.values()), slug


@pytest.mark.parametrize("seqlen, tuned", [(1, 1024), (300, 1024), (2048, 1024), (2049, 4096), (8192, 4096),
                                           (9000, 16384), (10**6, 16384)])
def test_tiles_of_the_nearest_tuned_length(seqlen, tuned):
    """A problem takes the tiles tuned at the sequence length nearest its own, on a log scale."""
    a = importlib.import_module("flashverify.kernels.attention")
    assert a.nearest_tuned({16384: None, 1024: None, 4096: None}, seqlen) == tuned


def test_tile_table_of_another_schema_is_a_clear_error(tmp_path, monkeypatch):
    a = importlib.import_module("flashverify.kernels.attention")
    (tmp_path / "some-gpu.json").write_text('{"schema": "flashverify.tiles/0", "tiles": {}}')
    monkeypatch.setattr(a, "TILES_DIR", str(tmp_path))
    a.tuned_tiles.cache_clear()
    try:
        with pytest.raises(ValueError, match="some-gpu.json.*schema.*re-measure it with benchmarks/tune.py"):
            a.tuned_tiles("some-gpu")
        assert a.tuned_tiles("unmeasured-gpu") == {}
    finally:
        a.tuned_tiles.cache_clear()
