"""float64 PyTorch oracle: attention forward and backward with explicit formulas.

Inputs are the *rounded* low-precision tensors, upcast exactly to float64, so the
oracle measures the kernel's error and nothing else. The semantics match
:func:`flashverify.kernels.attention` argument for argument, with dropout given
as an explicit keep-mask instead of a seed (so the oracle does not trust the
kernel's RNG; see :func:`flashverify.kernels.dropout_mask`).

Backward, with P the softmax, Z the keep-mask and r = 1/(1-p):
    O = (P o Z r) V,  dV = (P o Z r)^T dO,  dP = (dO V^T) o Z r,
    delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij,  dS = P o (dP - delta),
    dQ = scale dS K,  dK = scale dS^T Q.
With GQA, K/V are repeated per query head and dK/dV summed over each group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Masking:
    """Every rule that removes or biases a score, with the kernel's argument names."""
    causal: bool = False
    causal_alignment: str = "top_left"
    window: tuple | None = None
    key_lengths: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None

    def allowed_and_bias(self, B, H, nq, nk, device="cpu"):
        """Boolean (B, H, Nq, Nk) of allowed scores and the float64 additive bias (or None)."""
        i = torch.arange(nq, device=device).view(1, 1, nq, 1)
        j = torch.arange(nk, device=device).view(1, 1, 1, nk)
        if self.key_lengths is not None:
            valid_keys = self.key_lengths.to(device=device, dtype=torch.int64).view(B, 1, 1, 1)
        else:
            valid_keys = torch.full((B, 1, 1, 1), nk, device=device, dtype=torch.int64)
        allowed = j < valid_keys
        shift = valid_keys - nq if self.causal_alignment == "bottom_right" else torch.zeros_like(valid_keys)
        rel = j - (i + shift)
        left, right = self.window if self.window is not None else (None, None)
        if self.causal:
            right = 0
        if left is not None:
            allowed = allowed & (rel >= -left)
        if right is not None:
            allowed = allowed & (rel <= right)
        allowed = allowed.expand(B, H, nq, nk)
        bias = None
        if self.attn_mask is not None:
            m = self.attn_mask.to(device).expand(B, H, nq, nk)
            if m.dtype == torch.bool:
                allowed = allowed & m
            else:
                bias = m.to(torch.float64)
        return allowed, bias


@dataclass
class Forward:
    o: torch.Tensor      # (B, Hq, Nq, D) float64
    lse: torch.Tensor    # (B, Hq, Nq) float64, -inf on fully masked rows
    p: torch.Tensor      # (B, Hq, Nq, Nk) softmax before dropout, 0 where not allowed


@dataclass
class Gradients:
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


def _expand_kv(t, hq):
    return t.repeat_interleave(hq // t.shape[1], dim=1)


def _dropout_factor(keep, dropout_p, like):
    if keep is None or dropout_p == 0.0:
        return torch.ones((), dtype=torch.float64, device=like.device)
    return keep.to(torch.float64) / (1.0 - dropout_p)


def forward(q, k, v, masking: Masking = Masking(), scale=None, keep=None, dropout_p=0.0) -> Forward:
    """Exact-as-float64 attention forward; `keep` is the (B, Hq, Nq, Nk) dropout keep-mask."""
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    B, H, nq, D = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    s = (q @ k.transpose(-1, -2)) * scale
    allowed, bias = masking.allowed_and_bias(B, H, nq, nk, q.device)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse).unsqueeze(-1))
    o = (p * _dropout_factor(keep, dropout_p, p)) @ v
    return Forward(o=o, lse=lse, p=p)


def backward(q, k, v, do, masking: Masking = Masking(), scale=None, keep=None, dropout_p=0.0,
             fwd: Forward | None = None) -> Gradients:
    """dQ, dK, dV by the explicit formulas above (float64)."""
    fwd = fwd or forward(q, k, v, masking, scale, keep, dropout_p)
    hkv = k.shape[1]
    q, k, v, do = (t.detach().to(torch.float64) for t in (q, k, v, do))
    B, H, nq, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k, v = _expand_kv(k, H), _expand_kv(v, H)
    z = _dropout_factor(keep, dropout_p, fwd.p)
    p_drop = fwd.p * z
    dv = p_drop.transpose(-1, -2) @ do
    dp = (do @ v.transpose(-1, -2)) * z
    delta = (do * fwd.o).sum(-1, keepdim=True)
    ds = fwd.p * (dp - delta)
    dq = scale * (ds @ k)
    dk = scale * (ds.transpose(-1, -2) @ q)
    group = H // hkv
    fold = lambda t: t.view(B, hkv, group, *t.shape[2:]).sum(2)
    return Gradients(dq=dq, dk=fold(dk), dv=fold(dv))
