"""Reference Philox4x32-10 in numpy, as ``tl.rand`` computes it.

The dropout oracle should not trust the kernel's RNG code path: this rebuilds the
kernel's keep decision ``rand(seed, ((b*H + h)*Nq + i)*Nk + j) >= p`` independently,
for any offsets (so 64-bit offsets of huge problems can be checked at single points).
"""

from __future__ import annotations

import numpy as np

_KEY_A, _KEY_B = np.uint32(0x9E3779B9), np.uint32(0xBB67AE85)
_ROUND_A, _ROUND_B = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_MASK32 = np.uint64(0xFFFFFFFF)


def philox_uint32(seed: int, offsets: np.ndarray, rounds: int = 10) -> np.ndarray:
    """First 32-bit output of Philox4x32 keyed by `seed` with counter (offset_lo, offset_hi, 0, 0)."""
    offsets = np.asarray(offsets, dtype=np.uint64)
    c0 = (offsets & _MASK32).astype(np.uint32)
    c1 = (offsets >> np.uint64(32)).astype(np.uint32)
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)
    with np.errstate(over="ignore"):
        for _ in range(rounds):
            prod_b = _ROUND_B * c2.astype(np.uint64)
            prod_a = _ROUND_A * c0.astype(np.uint64)
            c0, c1, c2, c3 = (
                (prod_b >> np.uint64(32)).astype(np.uint32) ^ c1 ^ k0,
                (prod_b & _MASK32).astype(np.uint32),
                (prod_a >> np.uint64(32)).astype(np.uint32) ^ c3 ^ k1,
                (prod_a & _MASK32).astype(np.uint32),
            )
            k0 = np.uint32(k0 + _KEY_A)
            k1 = np.uint32(k1 + _KEY_B)
    return c0


def uniform(seed: int, offsets: np.ndarray) -> np.ndarray:
    """``tl.rand``: the uint32 as int32, negatives folded by ~x, times 4.6566127342e-10, in float32."""
    x = philox_uint32(seed, offsets).view(np.int32)
    x = np.where(x < 0, ~x, x)
    return x.astype(np.float32) * np.float32(4.6566127342e-10)


def keep(seed: int, dropout_p: float, b, h, i, j, heads: int, seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """The bundled kernel's keep decision for scores (b, h, i, j) (broadcasting index arrays)."""
    b, h, i, j = (np.asarray(x, dtype=np.uint64) for x in (b, h, i, j))
    offsets = ((b * np.uint64(heads) + h) * np.uint64(seqlen_q) + i) * np.uint64(seqlen_k) + j
    return uniform(seed, offsets) >= np.float32(dropout_p)
