"""Arbitrary-precision attention oracle (mpmath), certifying sampled rows and key columns.

Attention is row-separable: query row i's O, LSE and dQ depend only on row i's scores,
so a large problem is certified by a *sample* of rows instead of the whole matrix.

Exactness: every low-precision input (fp16, bf16, fp32, and the float64 scale/bias) is an
integer times a power of two, so all dot products (q.k, dO.v) are done *exactly* in Python
integers (numpy object arrays). Only exp/log/division go through mpmath at `prec` bits
(default 160, ~48 decimal digits); the probabilities (and dS) are then fixed to integers keeping
`prec + 32` bits of the largest term for the P.V, dS.K and dS^T.Q sums. Everything that
is not exact is therefore ~1e-48 relative to the largest term, or below.

Cost (measured on the 2-core CPU here, prec 160, pure-Python mpmath backend):
one forward+backward row of Nk = 8192, D = 128 in about 0.5-1 s (see tests/test_mp_oracle.py
and the issue notes); it is O(Nk * D) integer multiply-adds plus O(Nk) exps. A dK/dV
*column* needs every query row's LSE and delta (the rows that see that key), i.e. the
whole O(Nq * Nk * D) problem, so key columns are certified on problems up to ~1K x 1K.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mpmath
import numpy as np
import torch

from .oracles import Masking

DEFAULT_PREC = 160


def _exact_ints(t: torch.Tensor) -> tuple[np.ndarray, int]:
    """(integers as a numpy object array, shift) with t == ints * 2**-shift exactly."""
    x = t.detach().cpu().to(torch.float64).numpy()
    mant, exp = np.frexp(x)                 # x = mant * 2**exp, |mant| in [0.5, 1)
    ints_53 = (mant * 2.0**53).astype(np.int64)   # exact: float64 has 53 significand bits
    e = exp.astype(np.int64) - 53           # x = ints_53 * 2**e
    shift = int(-e[x != 0].min()) if np.any(x != 0) else 0
    amount = np.where(x != 0, e + shift, 0).astype(object)
    return np.left_shift(ints_53.astype(object), amount), shift


@dataclass
class Row:
    """Exact (to `prec` bits) results for query row i of head h, batch b."""
    o: list          # D mpf
    lse: object      # mpf, or -inf for a fully masked row
    delta: object    # rowsum(P o dP) (== dO . O), mpf
    dq: list | None  # D mpf, when dO was given


@dataclass
class Column:
    """Exact results for key j of kv head hk, batch b (summed over the GQA group)."""
    dk: list
    dv: list


class MpOracle:
    """mpmath oracle over the same arguments as :func:`flashverify.oracles.forward`/backward."""

    def __init__(self, q, k, v, do=None, masking: Masking = Masking(), scale=None, keep=None, dropout_p=0.0,
                 prec: int = DEFAULT_PREC):
        self.B, self.H, self.nq, self.D = q.shape
        self.hkv, self.nk = k.shape[1], k.shape[2]
        self.group = self.H // self.hkv
        self.prec = prec
        self.ctx = mpmath.MPContext()
        self.ctx.prec = prec
        self.frac_bits = prec + 32
        self.scale = self.ctx.mpf(float(1.0 / self.D**0.5 if scale is None else scale))
        self.Q, self.sq = _exact_ints(q)
        self.K, self.sk = _exact_ints(k)
        self.V, self.sv = _exact_ints(v)
        self.dO, self.sdo = _exact_ints(do) if do is not None else (None, 0)
        allowed, bias = masking.allowed_and_bias(self.B, self.H, self.nq, self.nk, "cpu")
        self.allowed = allowed.cpu().numpy()
        self.bias = None if bias is None else bias.cpu().numpy()
        if self.bias is not None:   # an additive -inf masks a key as surely as a False does
            self.allowed = self.allowed & (self.bias != -np.inf)
        self.keep = None if (keep is None or dropout_p == 0) else keep.detach().cpu().numpy()
        self.inv_keep = self.ctx.mpf(1) / (1 - self.ctx.mpf(float(dropout_p)))

    def _ldexp(self, n: int, e: int):
        return self.ctx.ldexp(self.ctx.mpf(n), e)

    def _fixed(self, values, other: np.ndarray, shift: int):
        """sum_n values[n] * other[n] * 2**-shift, exactly but for one rounding of each value.

        Each value is rounded to an integer multiple of 2**-F, with F chosen so the largest
        |value| keeps `prec` + 32 bits: the sum is then exact integer arithmetic, and
        relative to the largest term its error is below 2**-(prec+32) per term, however
        small the values are (a key almost never attended has P ~ 1e-50).
        """
        ctx = self.ctx
        biggest = max((abs(x) for x in values), default=ctx.mpf(0))
        if biggest == 0:
            return [ctx.mpf(0)] * other.shape[-1]
        frac = self.frac_bits - int(ctx.floor(ctx.log(biggest, 2)))
        ints = np.array([int(ctx.nint(ctx.ldexp(x, frac))) for x in values], dtype=object)
        return [self._ldexp(int(n), -(frac + shift)) for n in ints.dot(other)]

    @lru_cache(maxsize=None)
    def row(self, b: int, h: int, i: int) -> Row:
        ctx, hk = self.ctx, h // self.group
        allowed = np.nonzero(self.allowed[b, h, i])[0]
        if allowed.size == 0:
            zeros = [ctx.mpf(0)] * self.D
            return Row(o=zeros, lse=ctx.ninf, delta=ctx.mpf(0), dq=zeros if self.dO is not None else None)
        K, V = self.K[b, hk, allowed], self.V[b, hk, allowed]
        dots = K.dot(self.Q[b, h, i])
        s = [self._ldexp(int(n), -(self.sq + self.sk)) * self.scale for n in dots]
        if self.bias is not None:
            s = [x + ctx.mpf(float(self.bias[b, h, i, j])) for x, j in zip(s, allowed)]
        m = max(s)
        e = [ctx.exp(x - m) for x in s]
        total = ctx.fsum(e)
        lse = m + ctx.log(total)
        p = [x / total for x in e]
        z = [ctx.mpf(1)] * len(p)
        if self.keep is not None:
            z = [self.inv_keep if self.keep[b, h, i, j] else ctx.mpf(0) for j in allowed]
        o = self._fixed([pj * zj for pj, zj in zip(p, z)], V, self.sv)
        if self.dO is None:
            return Row(o=o, lse=lse, delta=ctx.mpf(0), dq=None)
        dp = [self._ldexp(int(n), -(self.sdo + self.sv)) * zj for n, zj in zip(V.dot(self.dO[b, h, i]), z)]
        delta = ctx.fdot(p, dp)
        dq = [x * self.scale for x in self._fixed([pj * (dpj - delta) for pj, dpj in zip(p, dp)], K, self.sk)]
        return Row(o=o, lse=lse, delta=delta, dq=dq)

    def column(self, b: int, hk: int, j: int) -> Column:
        """dK, dV of one key: needs P and dS of every query row (of every head in the group)."""
        if self.dO is None:
            raise ValueError("column() needs dO: pass do= to MpOracle")
        ctx = self.ctx
        dk = [ctx.mpf(0)] * self.D
        dv = [ctx.mpf(0)] * self.D
        kint = self.K[b, hk, j]
        vint = self.V[b, hk, j]
        for h in range(hk * self.group, (hk + 1) * self.group):
            rows = np.nonzero(self.allowed[b, h, :, j])[0]
            coef_v, coef_k = [], []
            for i in rows:
                r = self.row(b, h, int(i))
                s = self._ldexp(int(self.Q[b, h, i].dot(kint)), -(self.sq + self.sk)) * self.scale
                if self.bias is not None:
                    s += ctx.mpf(float(self.bias[b, h, i, j]))
                p = ctx.exp(s - r.lse)
                zj = ctx.mpf(1) if self.keep is None else (self.inv_keep if self.keep[b, h, i, j] else ctx.mpf(0))
                dp = self._ldexp(int(self.dO[b, h, i].dot(vint)), -(self.sdo + self.sv)) * zj
                coef_v.append(p * zj)
                coef_k.append(p * (dp - r.delta))
            if not coef_v:
                continue
            cv = self._fixed(coef_v, self.dO[b, h, rows], self.sdo)
            ck = self._fixed(coef_k, self.Q[b, h, rows], self.sq)
            dv = [a + n for a, n in zip(dv, cv)]
            dk = [a + n * self.scale for a, n in zip(dk, ck)]
        return Column(dk=dk, dv=dv)


def to_tensor(values) -> torch.Tensor:
    """mpf list -> float64 tensor (correctly rounded)."""
    return torch.tensor([float(x) for x in values], dtype=torch.float64)


def sample(mp: MpOracle, rows=(), columns=(), **tensors) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Gather `tensors` (o, lse, dq by row; dk, dv by column) at sampled positions.

    rows: (b, h, i) triples; columns: (b, hk, j) triples. Returns name -> (given values,
    exact values rounded to float64), both float64 tensors of the same shape.
    """
    out = {}
    for name, t in tensors.items():
        if t is None:
            continue
        t = t.detach().cpu().to(torch.float64)
        given, exact = [], []
        if name in ("o", "lse", "dq"):
            for b, h, i in rows:
                r = mp.row(b, h, i)
                given.append(t[b, h, i].reshape(-1))
                exact.append(to_tensor([r.lse]) if name == "lse" else to_tensor(getattr(r, name)))
        elif name in ("dk", "dv"):
            for b, hk, j in columns:
                c = mp.column(b, hk, j)
                given.append(t[b, hk, j])
                exact.append(to_tensor(getattr(c, name)))
        else:
            raise ValueError(f"tensor names are o, lse, dq, dk, dv; got {name!r}")
        if given:
            out[name] = (torch.cat(given), torch.cat(exact))
    return out
