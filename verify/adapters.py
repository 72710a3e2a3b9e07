"""Built-in adapters for the attention kernels torch ships: each SDPA backend and FlexAttention.

They are also the worked examples of the adapter API (docs/adapters.md): an SDPA backend
needs no code beyond the callable (capabilities are probed), FlexAttention needs a class
that turns a case's masking rules into a ``mask_mod``/``score_mod`` and declares what it
supports.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import replace

import torch

from .impls import Capabilities, Implementation, SdpaCallable, Unsupported

# What torch's SDPA raises when the pinned backend declines the inputs (torch 2.11 on CUDA; 2.13)
DECLINED = ("No available kernel", "No viable backend for scaled_dot_product_attention")

SDPA_BACKENDS = {"sdpa-math": "MATH", "sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                 "sdpa-cudnn": "CUDNN_ATTENTION"}


def sdpa_backend(name: str, device) -> SdpaCallable:
    """torch SDPA restricted to one backend; what the backend cannot do is found by probing
    (on a CPU build only math and flash exist: the others are reported as unsupported)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_BACKENDS[name])

    def fn(q, k, v, **kwargs):
        with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend):
            warnings.simplefilter("always")
            try:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
            except RuntimeError as e:
                if not any(text in str(e) for text in DECLINED):
                    raise
                # torch's dispatcher checked this backend's constraints and refused; it warns why
                reasons = "; ".join(dict.fromkeys(" ".join(str(w.message).split()) for w in caught))
                raise Unsupported(f"{name}: torch declines this case ({str(e).splitlines()[0][:120]})"
                                  + (f": {reasons[:400]}" if reasons else "")) from e

    return SdpaCallable(fn, name=name).probe(device)


class FlexAttention(Implementation):
    """torch's FlexAttention: masks as a ``mask_mod`` (block-sparse), additive masks as a ``score_mod``.

    Compiled on CUDA (the fused Triton kernel users run); eager elsewhere (torch's
    unfused reference path, slow but the same semantics). No dropout in FlexAttention.
    """
    name = "flex"
    capabilities = Capabilities(dropout=False, keep_mask=False, deterministic_dropout=False,
                                notes={"dropout": "FlexAttention has no dropout"})
    # flashverify.memory's CPU tracker is a TorchDispatchMode, which FlexAttention's eager path refuses
    cpu_memory_untracked = "FlexAttention's eager path runs under no TorchDispatchMode (measure it on a GPU)"

    def __init__(self, device="cuda"):
        if torch.device(device).type == "cpu":  # torch raises NotImplementedError for backward on the CPU
            notes = dict(self.capabilities.notes, backward="FlexAttention has no backward on the CPU")
            self.capabilities = replace(self.capabilities, backward=False, notes=notes)
        else:  # the compiled kernel: "NYI: embedding dimension ... must be at least 16" (torch 2.11)
            notes = dict(self.capabilities.notes, head_dims="compiled FlexAttention needs head_dim >= 16")
            self.capabilities = replace(self.capabilities, head_dims=(16, 256), notes=notes)

    def _flex(self, device):
        from torch.nn.attention.flex_attention import flex_attention
        if torch.device(device).type != "cuda":
            return flex_attention
        return compiled_flex_attention()

    def prepare(self, case, inputs):
        """The block mask and score_mod of a problem: built once, as users do, outside measurements."""
        self._prepared = (case, inputs, *self._mods(case, inputs))

    def _mods(self, case, inputs):
        from torch.nn.attention.flex_attention import create_block_mask

        prepared = getattr(self, "_prepared", None)
        if prepared is not None and prepared[0] == case and prepared[1] is inputs:
            return prepared[2:]
        B, H, nq, nk = case.batch, case.heads_q, case.seqlen_q, case.seqlen_k
        masking = case.masking(inputs)
        mask_mod = _mask_mod(masking, nq, nk)
        block_mask = None
        if mask_mod is not None:
            block_mask = create_block_mask(mask_mod, B, H, nq, nk, device=inputs.q.device)
        score_mod = None
        if masking.attn_mask is not None and masking.attn_mask.dtype != torch.bool:
            bias = masking.attn_mask.expand(B, H, nq, nk)

            def score_mod(score, b, h, i, j):
                return score + bias[b, h, i, j]
        return block_mask, score_mod

    def forward(self, case, inputs, q, k, v):
        block_mask, score_mod = self._mods(case, inputs)
        flex = self._flex(q.device)
        args = dict(score_mod=score_mod, block_mask=block_mask, scale=case.scale,
                    enable_gqa=case.heads_q != case.heads_kv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "flex_attention called without torch.compile()"
            try:
                from torch.nn.attention.flex_attention import AuxRequest  # torch >= 2.9
            except ImportError:
                return flex(q, k, v, return_lse=True, **args)
            o, aux = flex(q, k, v, return_aux=AuxRequest(lse=True), **args)
            return o, aux.lse


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled as users run it, once per shape (dynamic=False). Every new shape is a
    new graph: past dynamo's default recompile limit it would fall back to the eager (unfused)
    path, and we would test and time something users do not run; so the limit is raised."""
    import torch._dynamo as dynamo
    from torch.nn.attention.flex_attention import flex_attention
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 1024)
    return torch.compile(flex_attention, dynamic=False)


def _mask_mod(m, nq, nk):
    """The case's masking rules (oracles.Masking) as a FlexAttention mask_mod, or None if nothing is masked."""
    rules = []
    lengths = m.key_lengths
    if lengths is not None:
        rules.append(lambda b, h, i, j: j < lengths[b])
    left, right = m.window if m.window is not None else (None, None)
    if m.causal:
        right = 0
    if left is not None or right is not None:
        bottom_right = m.causal_alignment == "bottom_right"

        def diagonal(b):  # key index aligned with query 0
            if not bottom_right:
                return 0
            return (lengths[b] if lengths is not None else nk) - nq

        if left is not None:
            rules.append(lambda b, h, i, j: j - (i + diagonal(b)) >= -left)
        if right is not None:
            rules.append(lambda b, h, i, j: j - (i + diagonal(b)) <= right)
    if m.attn_mask is not None and m.attn_mask.dtype == torch.bool:
        allowed = m.attn_mask
        rules.append(lambda b, h, i, j: allowed[b if allowed.shape[0] > 1 else 0, h if allowed.shape[1] > 1 else 0,
                                                i, j])
    if m.attn_mask is not None and m.attn_mask.dtype != torch.bool:
        bias = m.attn_mask  # -inf entries of an additive mask remove the score; the block mask must know
        rules.append(lambda b, h, i, j: bias[b if bias.shape[0] > 1 else 0, h if bias.shape[1] > 1 else 0,
                                             i, j] != float("-inf"))
    if not rules:
        return None

    def mask_mod(b, h, i, j):
        out = rules[0](b, h, i, j)
        for rule in rules[1:]:
            out = out & rule(b, h, i, j)
        return out
    return mask_mod
