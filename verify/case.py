"""A replayable attention problem: everything needed to rebuild the exact inputs.

A :class:`Case` is plain data (ints, strings, tuples), so it prints as a one-line
reproducer and round-trips through JSON; :meth:`Case.inputs` rebuilds the same
tensors from its seed on any machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from .oracles import Masking

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DISTRIBUTIONS = ("normal", "uniform", "large_logits", "underflow", "outliers", "one_hot", "constant_rows")
MASK_KINDS = (None, "bool", "additive")
LAYOUTS = ("bhnd", "bnhd")


@dataclass(frozen=True)
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    attn_mask: torch.Tensor | None
    key_lengths: torch.Tensor | None


@dataclass(frozen=True)
class Case:
    batch: int = 1
    heads_q: int = 2
    heads_kv: int = 2
    seqlen_q: int = 64
    seqlen_k: int = 64
    head_dim: int = 64
    dtype: str = "float16"
    causal: bool = False
    causal_alignment: str = "top_left"
    window: tuple | None = None
    key_lengths: tuple | None = None
    mask: str | None = None            # None | "bool" (random keep, p=0.7) | "additive" (N(0,1), some -inf)
    mask_broadcast: bool = False       # mask of shape (1, 1, Nq, Nk) instead of (B, Hq, Nq, Nk)
    scale: float | None = None
    dropout_p: float = 0.0
    seed: int = 0
    distribution: str = "normal"
    layout: str = "bhnd"               # "bnhd": tensors are transposed views of (B, N, H, D) storage

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")
        if self.mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS}, got {self.mask!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.window is not None:
            object.__setattr__(self, "window", tuple(self.window))
        if self.key_lengths is not None:
            object.__setattr__(self, "key_lengths", tuple(self.key_lengths))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim) if self.scale is None else self.scale

    def replace(self, **changes) -> "Case":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)

    def __repr__(self):
        default = Case()
        args = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items() if getattr(default, k) != v)
        return f"Case({args})"

    def _draw(self, gen, shape):
        """One input tensor from the case's distribution (float32, CPU)."""
        d = self.distribution
        if d == "uniform":
            return torch.rand(shape, generator=gen) * 2 - 1
        x = torch.randn(shape, generator=gen)
        if d == "large_logits":
            return x * 4.0  # scores ~ 16x larger than normal's: softmax near one-hot, exp far from 1
        if d == "underflow":
            return x * 8.0  # scores ~ 64x: most P underflow float32, some land in the subnormals (flush-to-zero)
        if d == "outliers":  # FlashAttention-3's mix: N(0,1) + N(0,100) * Bernoulli(0.001)
            spikes = torch.randn(shape, generator=gen) * 10.0
            return x + spikes * (torch.rand(shape, generator=gen) < 0.001)
        if d == "constant_rows":
            return x[..., :1].expand(shape).clone()
        return x

    def inputs(self, device="cpu") -> Inputs:
        """The case's tensors, built from its seed; q/k/v/do require no grad."""
        gen = torch.Generator().manual_seed(self.seed)
        B, Hq, Hkv, nq, nk, D = (self.batch, self.heads_q, self.heads_kv, self.seqlen_q, self.seqlen_k,
                                 self.head_dim)
        q = self._draw(gen, (B, Hq, nq, D))
        k = self._draw(gen, (B, Hkv, nk, D))
        v = self._draw(gen, (B, Hkv, nk, D))
        do = torch.randn((B, Hq, nq, D), generator=gen)
        if self.distribution == "one_hot":  # each query nearly copies one key: softmax ~ one-hot
            pick = torch.randint(0, nk, (B, Hq, nq), generator=gen)
            kk = k.repeat_interleave(Hq // Hkv, dim=1)
            q = 4.0 * torch.gather(kk, 2, pick.unsqueeze(-1).expand(B, Hq, nq, D)) + 0.1 * q
        attn_mask = None
        mshape = (1, 1, nq, nk) if self.mask_broadcast else (B, Hq, nq, nk)
        if self.mask == "bool":
            attn_mask = torch.rand(mshape, generator=gen) < 0.7
        elif self.mask == "additive":
            attn_mask = torch.randn(mshape, generator=gen)
            attn_mask = attn_mask.masked_fill(torch.rand(mshape, generator=gen) < 0.2, -math.inf)
            attn_mask = attn_mask.to(self.torch_dtype)
        key_lengths = torch.tensor(self.key_lengths, dtype=torch.int64) if self.key_lengths is not None else None

        def place(t):
            t = t.to(self.torch_dtype)
            if self.layout == "bnhd":
                t = t.transpose(1, 2).contiguous().transpose(1, 2)
            return t.to(device)

        return Inputs(q=place(q), k=place(k), v=place(v), do=place(do),
                      attn_mask=None if attn_mask is None else attn_mask.to(device),
                      key_lengths=None if key_lengths is None else key_lengths.to(device))

    def masking(self, inputs: Inputs) -> Masking:
        return Masking(causal=self.causal, causal_alignment=self.causal_alignment, window=self.window,
                       key_lengths=inputs.key_lengths, attn_mask=inputs.attn_mask)

    @property
    def flops(self) -> float:
        """Forward FLOPs as FlashAttention-2 counts them (4 B H Nq Nk D; halved when causal)."""
        f = 4.0 * self.batch * self.heads_q * self.seqlen_q * self.seqlen_k * self.head_dim
        return f / 2 if self.causal else f
