"""Triton FlashAttention-2 kernels: forward, backward preprocess, dK/dV and dQ.

The module is plain Triton so it runs unchanged under ``TRITON_INTERPRET=1``
(numpy on the CPU) and natively on a GPU. Layout is (B, H, N, D) with explicit
strides, so transposed views need no copy.

Conventions shared by every kernel:

* scores live in *score units*: for fp16/bf16 the log2 domain, ``s = (q . k) * scale * log2(e)``,
  so the fast ``exp2`` can be used; for float32 inputs (PRECISE_EXP) natural units with a
  correctly rounded ``exp``, since folding log2(e) into the scale shifts every score by the
  same relative rounding and doubled float32 errors. The saved LSE is always natural-log.
  With FOLD_SCALE (a positive scale, no additive mask) tiles hold the unscaled q . k and the
  scale is applied inside the exponent, ``exp(s * scale - max)``: one FMA and one rounding per
  score where scaling first took a multiply and a subtract (see _exponent_scale).
* a score is *allowed* when the key is inside the sequence's key length, inside
  the causal/sliding window, and not removed by a boolean mask. Disallowed
  scores are ``-inf``; a query row with no allowed key gets O = 0, LSE = -inf
  and zero gradients.
* dropout keeps score (b, h, i, j) when ``rand(seed, ((b*H + h)*Nq + i)*Nk + j)
  >= p``: 64-bit Philox offsets, so forward, backward and
  :func:`_dropout_mask_kernel` regenerate the identical mask for any size.
* the backward needs no atomics: dK/dV and dQ are separate kernels, so
  gradients are bitwise deterministic.
* every loop over blocks is split (see _split) into edge blocks, where scores are masked one
  by one, around interior blocks that lie wholly inside the sequence and the causal/sliding
  window, where no per-score masking runs (causal loop splitting): three loops in the forward and
  dQ kernels, one loop with a runtime edge test in dK/dV (see _dkdv_blocks). Blocks wholly
  outside the window are not visited.
* the loops' tile loads (K, V in the forward and dQ kernels, Q, dO in dK/dV) go through TMA
  tensor descriptors under the TMA constexpr, else through pointers with masks: the same
  values, so the same bits (attention._tma_pair decides per tile and tensor).
"""

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Two bfloat16 defects of Triton's interpreter (seen on triton 3.8.0), worked around only
# there: tl.dot multiplies bf16 operands as their raw uint16 bits (see _dot), and float32 ->
# bf16 casts truncate (round toward zero) where GPUs round to nearest even (see _cast).
INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_ADD = tl.constexpr(2)


# Integer arguments that take many values across a property run and whose "== 1" / "% 16 == 0"
# properties buy nothing on the hot path: not specialized on (Triton would compile a kernel for
# every combination; a release run of the property suite compiles thousands). Strides and D set
# the alignment of tile loads and stay specialized; so do the sequence lengths, whose
# specialization measurably saves registers (benchmarks/ptxas_check.py: unspecialized NQ made the
# D=128 dK/dV kernel spill 4x more, NK the dropout paths). The dK/dV kernel keeps GROUP
# specialized: GROUP == 1 (no GQA) folds its loop over the group's query heads away; left
# dynamic, that loop makes ptxas spill registers at D=128 ('gqa' rows of the same check).
NOT_SPECIALIZED = ["H", "GROUP", "win_left", "win_right", "seed"]
DKDV_NOT_SPECIALIZED = ["H", "HKV", "win_left", "win_right", "seed"]


@triton.jit
def _round_to_tf32(x):
    """Round float32 to tf32 (10-bit mantissa), to nearest, ties away - as cuBLAS does. The MMA
    unit itself drops the low 13 bits (truncation), which measured ~3x cuBLAS's tf32 error."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b with float32 accumulation.

    Under the interpreter the product is formed in float64 and rounded once to float32: numpy's
    float32 matmul sums in an order that depends on operand layout, so the backward's k @ q^T
    would differ from the forward's q @ k^T by an ulp of |s| (on a GPU both run the same FMA /
    exact-product MMA chain over D and agree). This also sidesteps the interpreter's bf16 dot
    defect (it multiplies the raw uint16 bits).
    """
    if INTERPRETING:
        return tl.dot(_widen(a).to(tl.float64), _widen(b).to(tl.float64)).to(tl.float32)
    if DOT_PRECISION == "tf32":
        a = _round_to_tf32(a)
        b = _round_to_tf32(b)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr):
    """float32 -> dtype, rounding to nearest even on every backend.

    The interpreter (triton 3.8.0) truncates float32 -> bf16 and garbles bf16 subnormals, so
    there the bf16 bits are formed by hand: round the float32 bits to nearest even, keep the top half.
    """
    if INTERPRETING:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


@triton.jit
def _widen(x):
    """x as float32, exactly. The interpreter (triton 3.8.0) converts bf16 subnormals wrongly
    (2.02e-39 -> 4.41e-39), so there bf16 is widened through its bits."""
    if INTERPRETING:
        if x.dtype == tl.bfloat16:
            return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _exp(x, PRECISE: tl.constexpr):
    """exp in the kernel's score domain (see SCORE_UNITS): base 2 via the GPU's fast ex2.approx
    for fp16/bf16, base e via libdevice's correctly rounded expf for float32 inputs."""
    if PRECISE:
        if INTERPRETING:
            return tl.exp(x)  # numpy: accurate already (and libdevice does not exist there)
        return libdevice.exp(x)
    return tl.exp2(x)


@triton.jit
def _log(x, PRECISE: tl.constexpr):
    """Natural log; correctly rounded for float32 inputs."""
    if PRECISE:
        if not INTERPRETING:
            return libdevice.log(x)
    return tl.log(x)


@triton.jit
def _keep(seed, bh, qi, kj, NQ, NK, dropout_p):
    """Dropout keep-mask for a tile; one formula for forward, backward and materialization.

    qi, kj: query and key indices, broadcastable against each other (either orientation).
    """
    offset = (bh.to(tl.int64) * NQ + qi.to(tl.int64)) * NK + kj.to(tl.int64)
    return tl.rand(seed, offset) >= dropout_p


@triton.jit
def _window_mask(s2, qi, kj, nk, shift, win_left, win_right, NQ):
    """Scores outside the sequences (query rows, the batch entry's valid keys) or the causal/sliding
    window -> -inf; qi, kj broadcast to s2 in either orientation."""
    rel = kj - (qi + shift)
    allowed = (qi < NQ) & (kj < nk) & (rel >= -win_left) & (rel <= win_right)
    return tl.where(allowed, s2, float("-inf"))


@triton.jit
def _masked_scores(s2, qi, kj, nk, shift, win_left, win_right, mask_ptr, smm, smn, NQ, NK, qk_scale,
                   EDGE: tl.constexpr, MASK_KIND: tl.constexpr, PRECISE_EXP: tl.constexpr, FOLD_SCALE: tl.constexpr):
    """Scale a tile of q . k products to score units (unless FOLD_SCALE leaves that to the
    exponent) and apply the masking rules; disallowed -> -inf.

    qi, kj: query and key indices shaped to broadcast to s2 ([M, 1] and [1, N], or transposed).
    EDGE tiles check sequence bounds and the causal/sliding window per score; interior tiles
    (see _split) lie wholly inside both, so only a user mask (if any) is applied there.
    """
    if not FOLD_SCALE:
        s2 = s2 * qk_scale
    if EDGE:
        s2 = _window_mask(s2, qi, kj, nk, shift, win_left, win_right, NQ)
    in_bounds = (qi < NQ) & (kj < NK)
    if MASK_KIND == MASK_BOOL:
        keep = tl.load(mask_ptr + qi * smm + kj * smn, mask=in_bounds, other=0)
        s2 = tl.where(keep != 0, s2, float("-inf"))
    if MASK_KIND == MASK_ADD:
        bias = _widen(tl.load(mask_ptr + qi * smm + kj * smn, mask=in_bounds, other=0.0))
        if PRECISE_EXP:
            s2 = s2 + bias
        else:
            s2 = s2 + bias * LOG2E
    return s2


@triton.jit
def _exponent_scale(qk_scale, FOLD_SCALE: tl.constexpr):
    """The factor scores still need inside the exponent: qk_scale when folded (FOLD_SCALE: the
    max of a row is max(s) * scale, exact for scale > 0 since rounding is monotonic, and
    s * scale - max contracts to one FMA), else 1 (scores were scaled first, as an additive mask's
    bias in score units requires). Why: one instruction less per score (with EDGES, H200 D=128
    dense: backward 8-17 % faster, forward 1-8 %; docs/performance.md, v5)."""
    if FOLD_SCALE:
        return qk_scale
    else:
        return 1.0


@triton.jit
def _key_length_and_shift(keylen_ptr, b, NQ, NK, KEYLEN: tl.constexpr, ALIGN_BOTTOM_RIGHT: tl.constexpr):
    """Valid keys of batch entry b, and the causal/window diagonal's offset."""
    nk = NK
    if KEYLEN:
        nk = tl.load(keylen_ptr + b)
    shift = 0
    if ALIGN_BOTTOM_RIGHT:
        shift = nk - NQ
    return nk, shift


@triton.jit
def _split(lo, hi, first, full_end, BLOCK: tl.constexpr):
    """Cut the loop over blocks [lo, hi) (lo block-aligned) into edge, interior, edge.

    Returns (lo, a, b, hi): blocks starting in [a, b) begin at or after `first` and end by
    `full_end`, so every score in them is allowed and needs no per-score masking (causal loop
    splitting); blocks in [lo, a) and [b, hi) are masked per score. Empty when hi <= lo.
    """
    hi = tl.maximum(hi, lo)
    hi_blk = ((hi + BLOCK - 1) // BLOCK) * BLOCK
    a = ((tl.maximum(first, lo) + BLOCK - 1) // BLOCK) * BLOCK
    a = tl.maximum(lo, tl.minimum(a, hi_blk))
    b = (tl.maximum(full_end, 0) // BLOCK) * BLOCK
    b = tl.maximum(a, tl.minimum(b, hi_blk))
    return lo, a, b, hi


@triton.jit
def _key_blocks(m0, nk, shift, win_left, win_right, NQ, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks the query block [m0, m0 + BLOCK_M) can see, split by _split.

    A score (i, j) is allowed when j < nk and -win_left <= j - (i + shift) <= win_right (an
    absent window is 'unbounded', see attention._window_bounds): key blocks outside the window
    are skipped, and a key block is interior when that holds for its corner scores. The corner
    is the last row inside the sequence, not the tile's: rows past NQ are never stored, and
    counted they reached beyond an 'unbounded' window whenever BLOCK_M > nk, so a 128-row tile
    over 32 keys had no interior block, and the forward, which compiles no edge loops where
    nothing needs masking (attention._edges), did no work at all.
    """
    lo = tl.maximum(m0 + shift - win_left, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(nk, m0 + BLOCK_M + shift + win_right)
    last_row = tl.minimum(m0 + BLOCK_M, NQ) - 1
    return _split(lo, hi, last_row + shift - win_left, tl.minimum(nk, m0 + shift + win_right + 1), BLOCK_N)


@triton.jit
def _query_blocks(n0, nk, shift, win_left, win_right, NQ, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see the key block [n0, n0 + BLOCK_N), split by _split (the transpose of
    _key_blocks); keys at or past the sequence's length nk get no query at all."""
    lo = tl.maximum(n0 - shift - win_right, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(NQ, n0 + BLOCK_N - shift + win_left)
    hi = tl.where(n0 >= nk, lo, hi)
    full_end = tl.minimum(NQ, n0 - shift + win_left + 1)
    full_end = tl.where(n0 + BLOCK_N <= nk, full_end, 0)
    return _split(lo, hi, n0 + BLOCK_N - 1 - shift - win_right, full_end, BLOCK_M)


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a tile of rows x head dim, masked only where it can run past the tensor: rows past the
    sequence (edge blocks only: interior blocks lie wholly inside it, see _split) and a head dim
    padded to BLOCK_D (EVEN_D: D == BLOCK_D). Unmasked loads vectorize and pipeline freely."""
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok, other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok & d_ok, other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok, other=0.0)
    return x


@triton.jit
def _load_kv(k_base, v_base, b, hk, start_n, offs_n, offs_d, d_ok, skn, skd, svn, svd, NK, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, EDGE: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr):
    """The key and value tiles of the key block at offs_n (forward and dQ loops). TMA: k_base and
    v_base are the tensor descriptors of K and V (attention._tma_rows), which load rows past NK
    and columns past D as zeros."""
    if TMA:
        k = k_base.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_base.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        n_ok = offs_n[:, None] < NK
        k = _load_tile(k_base + offs_n[:, None] * skn + offs_d[None, :] * skd, n_ok, d_ok, EDGE, EVEN_D)
        v = _load_tile(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd, n_ok, d_ok, EDGE, EVEN_D)
    return k, v


@triton.jit
def _kv_bases(K, V, b, hk, skb, skh, svb, svh, TMA: tl.constexpr):
    """What _load_kv takes for KV head hk of batch b: the descriptors themselves (TMA, which
    address by coordinates), else the pointers to that head's first row."""
    if TMA:
        k_base, v_base = K, V
    else:
        k_base, v_base = K + b * skb + hk * skh, V + b * svb + hk * svh
    return k_base, v_base


@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, start, end, offs_m, offs_d, d_ok, skn, skd, svn, svd,
                nk, shift, win_left, win_right, mask_base, smm, smn, NQ, NK, qk_scale, bh, dropout_p, seed,
                BLOCK_N: tl.constexpr, EDGE: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr,
                DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, PRECISE_EXP: tl.constexpr,
                FOLD_SCALE: tl.constexpr, b, hk, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """Online softmax over the key blocks [start, end) for one query block."""
    c = _exponent_scale(qk_scale, FOLD_SCALE)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, b, hk, start_n, offs_n, offs_d, d_ok, skn, skd, svn, svd, NK, BLOCK_N, BLOCK_D,
                        EDGE, EVEN_D, TMA)
        s2 = _masked_scores(_dot(q, tl.trans(k), DOT_PRECISION), offs_m[:, None], offs_n[None, :], nk, shift,
                            win_left, win_right, mask_base, smm, smn, NQ, NK, qk_scale, EDGE, MASK_KIND, PRECISE_EXP,
                            FOLD_SCALE)
        m_new = tl.maximum(m_i, tl.max(s2, 1) * c)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
        p = _exp(s2 * c - m_safe[:, None], PRECISE_EXP)
        alpha = _exp(m_i - m_safe, PRECISE_EXP)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, bh, offs_m[:, None], offs_n[None, :], NQ, NK, dropout_p), p, 0.0)
        acc = acc * alpha[:, None] + _dot(_cast(p, v.dtype), v, DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _fwd_kernel(Q, K, V, O, LSE, STATS, MASK, KEYLEN,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sob, soh, som, sod, smb, smh, smm, smn,
                H, GROUP, NQ, NK, D, qk_scale, win_left, win_right, dropout_p, seed, STATS_LOGL,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                ALIGN_BOTTOM_RIGHT: tl.constexpr, KEYLEN_ON: tl.constexpr,
                MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                PRECISE_EXP: tl.constexpr, FOLD_SCALE: tl.constexpr, EDGES: tl.constexpr, TMA: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D

    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < NQ) & d_ok, other=0.0)
    k_base, v_base = _kv_bases(K, V, b, hk, skb, skh, svb, svh, TMA)
    mask_base = MASK + b * smb + h * smh

    nk, shift = _key_length_and_shift(KEYLEN, b, NQ, NK, KEYLEN_ON, ALIGN_BOTTOM_RIGHT)
    lo, mid_lo, mid_hi, hi = _key_blocks(pid_m * BLOCK_M, nk, shift, win_left, win_right, NQ, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Edge blocks, interior blocks (no per-score masking), edge blocks; without EDGES (no window, no key
    # lengths, NK a multiple of BLOCK_N) every block is interior and the edge loops are not compiled.
    if EDGES:
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, lo, mid_lo, offs_m, offs_d, d_ok, skn, skd, svn,
                                    svd, nk, shift, win_left, win_right, mask_base, smm, smn, NQ, NK, qk_scale, bh,
                                    dropout_p, seed, BLOCK_N, True, EVEN_D, MASK_KIND, DROPOUT, DOT_PRECISION,
                                    PRECISE_EXP, FOLD_SCALE, b, hk, BLOCK_D, TMA)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, mid_lo, mid_hi, offs_m, offs_d, d_ok, skn, skd,
                                svn, svd, nk, shift, win_left, win_right, mask_base, smm, smn, NQ, NK, qk_scale, bh,
                                dropout_p, seed, BLOCK_N, False, EVEN_D, MASK_KIND, DROPOUT, DOT_PRECISION,
                                PRECISE_EXP, FOLD_SCALE, b, hk, BLOCK_D, TMA)
    if EDGES:
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_base, v_base, mid_hi, hi, offs_m, offs_d, d_ok, skn, skd, svn,
                                    svd, nk, shift, win_left, win_right, mask_base, smm, smn, NQ, NK, qk_scale, bh,
                                    dropout_p, seed, BLOCK_N, True, EVEN_D, MASK_KIND, DROPOUT, DOT_PRECISION,
                                    PRECISE_EXP, FOLD_SCALE, b, hk, BLOCK_D, TMA)

    if DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    # Row statistics for the backward in score units (0 on empty rows), read by _row_stats.
    m_store = tl.where(empty, 0.0, m_i)
    if PRECISE_EXP:
        logl = _log(tl.where(empty, 1.0, l_i), PRECISE_EXP)
        lse = tl.where(empty, float("-inf"), m_i + logl)
    else:
        logl = tl.log2(tl.where(empty, 1.0, l_i))
        lse = tl.where(empty, float("-inf"), (m_i + logl) * LN2)
    row_ok = offs_m < NQ
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             _cast(o, O.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    tl.store(LSE + bh * NQ + offs_m, lse, mask=row_ok)
    if PRECISE_EXP:
        tl.store(STATS + bh * NQ + offs_m, m_store, mask=row_ok)
        tl.store(STATS + STATS_LOGL + bh * NQ + offs_m, logl, mask=row_ok)
    else:
        tl.store(STATS + bh * NQ + offs_m, tl.where(empty, 0.0, m_i + logl), mask=row_ok)


@triton.jit(do_not_specialize=["H", "NQ"])   # a light kernel: not worth a compile per sequence length
def _bwd_delta_kernel(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd, H, NQ, D,
                      BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta_i = sum_d dO[i, d] * O[i, d] (the rowsum(dO o O) of FlashAttention-2)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < NQ) & (offs_d[None, :] < D)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, mask=ok, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdm + offs_d[None, :] * sdd, mask=ok, other=0.0)
    delta = tl.sum(_widen(o) * _widen(do), 1)
    tl.store(DELTA + bh * NQ + offs_m, delta, mask=offs_m < NQ)


@triton.jit
def _row_stats(STATS, STATS_LOGL, bh, offs_m, NQ, CHECK_ROWS: tl.constexpr, PRECISE_EXP: tl.constexpr):
    """The forward's row statistics, from which the backward recomputes P = exp(s - m - log l).

    float32 (PRECISE_EXP): the max m and log l apart, P = exp((s - m) - log l): s - m is exact
    near the max and log l is small, so P keeps ~1 float32 ulp, where exp(s - (m + log l)) would
    cost up to |m + log l| ulps. 16-bit inputs: m + log l in one vector, and log l returned as 0:
    x - 0 is x, so _bwd_probs' subtraction compiles to nothing (the same PTX as a kernel without
    it, benchmarks/ptxas_check.py --against, session 14). Its rounding, about |LSE| float32 ulps
    of P, is within the error model's LSE term (verify/bounds.py) and, at |LSE| = 10, 800 (fp16)
    to 6,500 (bf16) times below P's own rounding to 16 bits. One per-row vector fewer in its
    loops: the backward took 0.906-0.999 of the time before (H200 A/B, session 11,
    docs/performance.md).
    """
    row_max = _load_rows(STATS + bh * NQ, offs_m, NQ, CHECK_ROWS)
    if PRECISE_EXP:
        row_logl = _load_rows(STATS + STATS_LOGL + bh * NQ, offs_m, NQ, CHECK_ROWS)
    else:
        row_logl = tl.zeros_like(row_max)
    return row_max, row_logl


@triton.jit
def _bwd_probs(s2, c, row_max, row_logl, qi, kj, bh, NQ, NK, dropout_p, seed, DROPOUT: tl.constexpr,
               PRECISE_EXP: tl.constexpr):
    """From masked scores s2 of one tile (in score units once multiplied by c, see _exponent_scale):
    P recomputed from the row statistics, P with dropout applied (what the forward multiplied V by),
    and the keep mask (DROPOUT only).

    Orientation-free: qi/kj, row_max and row_logl come shaped to broadcast against the tile, so the
    dK/dV kernel can work on transposed tiles (keys as rows) without transposing registers.
    """
    p = _exp((s2 * c - row_max) - row_logl, PRECISE_EXP)   # 16-bit: row_max is m + log l, row_logl 0 (_row_stats)
    p_drop = p
    keep = p   # unused without dropout
    if DROPOUT:
        keep = _keep(seed, bh, qi, kj, NQ, NK, dropout_p)
        p_drop = tl.where(keep, p * (1.0 / (1.0 - dropout_p)), 0.0)
    return p, p_drop, keep


@triton.jit
def _bwd_dscores(p, dp, delta, keep, dropout_p, DROPOUT: tl.constexpr):
    """dS = P o (dP' - delta), where dP' is dP = dO.V^T passed back through the dropout mask."""
    if DROPOUT:
        dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
    return p * (dp - delta)


@triton.jit
def _load_rows(ptr, offs_m, NQ, CHECK_ROWS: tl.constexpr):
    """A per-query-row float32 vector (row max, log-normaliser, delta: 0 on fully masked rows);
    rows past the sequence are checked only where a block can reach them (CHECK_ROWS)."""
    if CHECK_ROWS:
        x = tl.load(ptr + offs_m, mask=offs_m < NQ, other=0.0)
    else:
        x = tl.load(ptr + offs_m)
    return x


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_base, do_base, lo, mid_lo, mid_hi, hi, offs_n, offs_d, D, d_ok, sqm, sqd, sdom,
                 sdod, STATS, STATS_LOGL, DELTA, bh, nk, shift, win_left, win_right, mask_base, smm, smn, NQ, NK,
                 qk_scale, dropout_p, seed, BLOCK_M: tl.constexpr, CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr,
                 MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 PRECISE_EXP: tl.constexpr, FOLD_SCALE: tl.constexpr, EDGES: tl.constexpr, b, h,
                 BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """dK, dV contributions of the query blocks [lo, hi) of one query head, on transposed tiles
    (keys as rows).

    One loop, not the forward's three (see _split): blocks outside [mid_lo, mid_hi) are masked
    score by score under a runtime test. Three loops here made ptxas (CUDA 12.8, triton 3.6)
    serialize every wgmma of the kernel (warning C7515: the accumulators' zero-initialisation
    reached the wait after a skipped loop), and the loads and dots follow FlexAttention's order
    (P, dV, then dP, dS, dK) to keep fewer tiles live. CHECK_ROWS: NQ is not a multiple of
    BLOCK_M, so a block can run past the sequence. Without EDGES (no window, no key lengths) the
    test is not compiled: query rows past NQ load as zeros and add exactly nothing to dK, dV, and
    key rows past NK (a partial key block) are never stored.
    """
    c = _exponent_scale(qk_scale, FOLD_SCALE)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if TMA:
            q_t = tl.trans(q_base.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D))   # [D, M]
        else:
            q_t = _load_tile(q_base + offs_m[None, :] * sqm + offs_d[:, None] * sqd, offs_m[None, :] < NQ,
                             offs_d[:, None] < D, CHECK_ROWS, EVEN_D)                    # [D, M]
        row_max, row_logl = _row_stats(STATS, STATS_LOGL, bh, offs_m, NQ, CHECK_ROWS, PRECISE_EXP)
        s2_t = _masked_scores(_dot(k, q_t, DOT_PRECISION), offs_m[None, :], offs_n[:, None], nk, shift, win_left,
                              win_right, mask_base, smm, smn, NQ, NK, qk_scale, False, MASK_KIND, PRECISE_EXP,
                              FOLD_SCALE)                                                 # [N, M]
        if EDGES:
            if (start_m < mid_lo) | (start_m >= mid_hi):
                s2_t = _window_mask(s2_t, offs_m[None, :], offs_n[:, None], nk, shift, win_left, win_right, NQ)
        p_t, p_drop_t, keep_t = _bwd_probs(s2_t, c, row_max[None, :], row_logl[None, :], offs_m[None, :],
                                           offs_n[:, None], bh, NQ, NK, dropout_p, seed, DROPOUT, PRECISE_EXP)
        if TMA:
            do = do_base.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
        else:
            do = _load_tile(do_base + offs_m[:, None] * sdom + offs_d[None, :] * sdod, offs_m[:, None] < NQ, d_ok,
                            CHECK_ROWS, EVEN_D)
        dv += _dot(_cast(p_drop_t, do.dtype), do, DOT_PRECISION)
        delta = _load_rows(DELTA + bh * NQ, offs_m, NQ, CHECK_ROWS)
        dp_t = _dot(v, tl.trans(do), DOT_PRECISION)                                     # [N, M]
        ds_t = _bwd_dscores(p_t, dp_t, delta[None, :], keep_t, dropout_p, DROPOUT)
        dk += _dot(_cast(ds_t, q_t.dtype), tl.trans(q_t), DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=DKDV_NOT_SPECIALIZED)
def _bwd_dkdv_kernel(Q, K, V, DO, STATS, DELTA, DK, DV, MASK, KEYLEN,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sdob, sdoh, sdom, sdod, sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
                     smb, smh, smm, smn,
                     H, HKV, GROUP, NQ, NK, D, qk_scale, sm_scale, win_left, win_right, dropout_p, seed, STATS_LOGL,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                     ALIGN_BOTTOM_RIGHT: tl.constexpr, KEYLEN_ON: tl.constexpr,
                     MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     PRECISE_EXP: tl.constexpr, FOLD_SCALE: tl.constexpr, EDGES: tl.constexpr,
                     CHECK_ROWS: tl.constexpr, TMA: tl.constexpr):
    """One key block of one KV head; loops over the query heads of its GQA group (no atomics)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // HKV
    hk = bhk % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    n_ok = offs_n[:, None] < NK
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skn + offs_d[None, :] * skd,
                mask=n_ok & d_ok, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                mask=n_ok & d_ok, other=0.0)

    nk, shift = _key_length_and_shift(KEYLEN, b, NQ, NK, KEYLEN_ON, ALIGN_BOTTOM_RIGHT)
    lo, mid_lo, mid_hi, hi = _query_blocks(pid_n * BLOCK_N, nk, shift, win_left, win_right, NQ, BLOCK_M, BLOCK_N)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        if TMA:
            q_base, do_base = Q, DO
        else:
            q_base = Q + b * sqb + h * sqh
            do_base = DO + b * sdob + h * sdoh
        mask_base = MASK + b * smb + h * smh
        dk, dv = _dkdv_blocks(dk, dv, k, v, q_base, do_base, lo, mid_lo, mid_hi, hi, offs_n, offs_d, D, d_ok, sqm, sqd,
                              sdom, sdod, STATS, STATS_LOGL, DELTA, bh, nk, shift, win_left, win_right, mask_base, smm,
                              smn, NQ, NK, qk_scale, dropout_p, seed, BLOCK_M, CHECK_ROWS, EVEN_D, MASK_KIND, DROPOUT,
                              DOT_PRECISION, PRECISE_EXP, FOLD_SCALE, EDGES, b, h, BLOCK_D, TMA)

    dk = dk * sm_scale
    tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             _cast(dk, DK.dtype.element_ty), mask=n_ok & d_ok)
    tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             _cast(dv, DV.dtype.element_ty), mask=n_ok & d_ok)


@triton.jit
def _dq_blocks(dq, q, do, row_max, row_logl, delta, k_base, v_base, start, end, offs_m, offs_d, d_ok, skn, skd,
               svn, svd, bh, nk, shift, win_left, win_right, mask_base, smm, smn, NQ, NK, qk_scale, dropout_p, seed,
               BLOCK_N: tl.constexpr, EDGE: tl.constexpr, EVEN_D: tl.constexpr, MASK_KIND: tl.constexpr,
               DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, PRECISE_EXP: tl.constexpr,
               FOLD_SCALE: tl.constexpr, b, hk, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """dQ contributions of the key blocks [start, end) for one query block."""
    c = _exponent_scale(qk_scale, FOLD_SCALE)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv(k_base, v_base, b, hk, start_n, offs_n, offs_d, d_ok, skn, skd, svn, svd, NK, BLOCK_N, BLOCK_D,
                        EDGE, EVEN_D, TMA)
        s = _dot(q, tl.trans(k), DOT_PRECISION)
        dp = _dot(do, tl.trans(v), DOT_PRECISION)
        s2 = _masked_scores(s, offs_m[:, None], offs_n[None, :], nk, shift, win_left, win_right, mask_base, smm, smn,
                            NQ, NK, qk_scale, EDGE, MASK_KIND, PRECISE_EXP, FOLD_SCALE)
        p, _, keep = _bwd_probs(s2, c, row_max[:, None], row_logl[:, None], offs_m[:, None], offs_n[None, :], bh, NQ, NK,
                                dropout_p, seed, DROPOUT, PRECISE_EXP)
        ds = _bwd_dscores(p, dp, delta[:, None], keep, dropout_p, DROPOUT)
        dq += _dot(_cast(ds, k.dtype), k, DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=NOT_SPECIALIZED)
def _bwd_dq_kernel(Q, K, V, DO, STATS, DELTA, DQ, MASK, KEYLEN,
                   sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                   sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd, smb, smh, smm, smn,
                   H, GROUP, NQ, NK, D, qk_scale, sm_scale, win_left, win_right, dropout_p, seed, STATS_LOGL,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                   ALIGN_BOTTOM_RIGHT: tl.constexpr, KEYLEN_ON: tl.constexpr,
                   MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   PRECISE_EXP: tl.constexpr, FOLD_SCALE: tl.constexpr, EDGES: tl.constexpr, TMA: tl.constexpr):
    """One query block of one head: dQ = sum over key blocks of dS . K."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    m_ok = (offs_m[:, None] < NQ) & d_ok
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd, mask=m_ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdom + offs_d[None, :] * sdod,
                 mask=m_ok, other=0.0)
    row_max, row_logl = _row_stats(STATS, STATS_LOGL, bh, offs_m, NQ, True, PRECISE_EXP)
    delta = _load_rows(DELTA + bh * NQ, offs_m, NQ, True)
    k_base, v_base = _kv_bases(K, V, b, hk, skb, skh, svb, svh, TMA)
    mask_base = MASK + b * smb + h * smh

    nk, shift = _key_length_and_shift(KEYLEN, b, NQ, NK, KEYLEN_ON, ALIGN_BOTTOM_RIGHT)
    lo, mid_lo, mid_hi, hi = _key_blocks(pid_m * BLOCK_M, nk, shift, win_left, win_right, NQ, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Edge blocks, interior blocks (no per-score masking), edge blocks (edges compiled only with EDGES, as in
    # the forward, or with a user mask: ptxas (CUDA 12.8) serializes the wgmma of a one-loop dQ kernel that
    # applies one, see benchmarks/ptxas_check.py).
    if EDGES or MASK_KIND != MASK_NONE:
        dq = _dq_blocks(dq, q, do, row_max, row_logl, delta, k_base, v_base, lo, mid_lo, offs_m, offs_d, d_ok, skn,
                        skd, svn, svd, bh, nk, shift, win_left, win_right, mask_base, smm, smn, NQ, NK, qk_scale,
                        dropout_p, seed, BLOCK_N, True, EVEN_D, MASK_KIND, DROPOUT, DOT_PRECISION, PRECISE_EXP,
                        FOLD_SCALE, b, hk, BLOCK_D, TMA)
    dq = _dq_blocks(dq, q, do, row_max, row_logl, delta, k_base, v_base, mid_lo, mid_hi, offs_m, offs_d, d_ok, skn,
                    skd, svn, svd, bh, nk, shift, win_left, win_right, mask_base, smm, smn, NQ, NK, qk_scale,
                    dropout_p, seed, BLOCK_N, False, EVEN_D, MASK_KIND, DROPOUT, DOT_PRECISION, PRECISE_EXP,
                    FOLD_SCALE, b, hk, BLOCK_D, TMA)
    if EDGES or MASK_KIND != MASK_NONE:
        dq = _dq_blocks(dq, q, do, row_max, row_logl, delta, k_base, v_base, mid_hi, hi, offs_m, offs_d, d_ok, skn,
                        skd, svn, svd, bh, nk, shift, win_left, win_right, mask_base, smm, smn, NQ, NK, qk_scale,
                        dropout_p, seed, BLOCK_N, True, EVEN_D, MASK_KIND, DROPOUT, DOT_PRECISION, PRECISE_EXP,
                        FOLD_SCALE, b, hk, BLOCK_D, TMA)

    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :] * sdqd,
             _cast(dq, DQ.dtype.element_ty), mask=m_ok)


@triton.jit
def _dropout_mask_kernel(OUT, seed, dropout_p, H, NQ, NK,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Write the keep-mask (uint8) the attention kernels use for (seed, shape)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, bh, offs_m[:, None], offs_n[None, :], NQ, NK, dropout_p)
    ptrs = OUT + (bh.to(tl.int64) * NQ + offs_m[:, None]) * NK + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < NQ) & (offs_n[None, :] < NK))
