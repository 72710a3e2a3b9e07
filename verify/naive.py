"""The naive attention a user would write, computed entirely in the input dtype.

Its error against the float64 oracle is the *reference error* of FlashAttention's
and PyTorch's test suites: what the same math costs in the same low precision.
Autograd through it gives the naive gradients.
"""

from __future__ import annotations

import math

import torch

from .oracles import Masking


def naive_attention(q, k, v, masking: Masking = Masking(), scale=None, keep=None, dropout_p=0.0):
    """softmax(q k^T * scale + mask) V with every op in q.dtype; fully masked rows give 0."""
    B, H, nq, D = q.shape
    nk = k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    v = v.repeat_interleave(H // v.shape[1], dim=1)
    s = (q @ k.transpose(-1, -2)) * scale
    allowed, bias = masking.allowed_and_bias(B, H, nq, nk, q.device)
    if bias is not None:
        s = s + bias.to(q.dtype)
    s = s.masked_fill(~allowed, -math.inf)
    p = torch.softmax(s, dim=-1)
    p = torch.where(torch.isneginf(s).all(-1, keepdim=True), torch.zeros_like(p), p)
    if keep is not None and dropout_p > 0.0:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return p @ v
