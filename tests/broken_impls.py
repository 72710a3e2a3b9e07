"""A blockwise flash attention in plain torch (any device), with switches that plant the bugs real kernels shipped.

`TorchFlash()` with no switch is correct (the property suite must pass it: no false
failures); each subclass below flips one switch. Used by tests/test_broken.py and
tests/test_plugin.py (through --attn-impl=broken_impls:NAME).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from flashverify import philox
from flashverify.impls import Bundled, Capabilities, Implementation, Unsupported

BLOCK = 16


class _Flash(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, impl, allowed, bias, keep, p_drop, scale):
        B, H, nq, D = q.shape
        nk = k.shape[2]
        heads = torch.arange(H, device=q.device)
        kv_head = (heads % k.shape[1]) if impl.gqa_modulo else (heads // (H // k.shape[1]))
        k, v = k[:, kv_head].float(), v[:, kv_head].float()
        qf = q.float()
        if impl.tf32_dots and q.dtype == torch.float32:   # what allow_tf32 does to a float32 matmul
            qf, k, v = _tf32(qf), _tf32(k), _tf32(v)
        m = torch.full((B, H, nq, 1), -math.inf, device=q.device)
        l = torch.zeros((B, H, nq, 1), device=q.device)
        acc = torch.zeros((B, H, nq, D), device=q.device)
        stop = nk - nk % BLOCK if impl.drop_partial_block else nk
        z = 1.0 if keep is None else keep.float() * (1 / (1 - p_drop) if impl.dropout_rescale else 1.0)
        for j in range(0, stop, BLOCK):
            s = (qf @ k[:, :, j:j + BLOCK].transpose(-1, -2)) * scale
            if bias is not None:
                s = s + bias[..., j:j + BLOCK]
            s = s.masked_fill(~allowed[..., j:j + BLOCK], -math.inf)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True)) if impl.subtract_max else torch.zeros_like(m)
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            p = torch.exp(s - m_safe)
            alpha = torch.exp(m - m_safe) if impl.rescale else torch.ones_like(m)
            l = l * alpha + p.sum(-1, keepdim=True)
            zj = z if keep is None else z[..., j:j + BLOCK]
            acc = (acc * alpha + (p * zj).to(q.dtype).float() @ v[:, :, j:j + BLOCK]).to(impl.accumulate).float()
            m = m_new
        o = acc / l if impl.nan_on_empty_rows else acc / torch.where(l == 0, 1.0, l)
        ctx.save_for_backward(q, k, v, o, allowed, keep)
        ctx.args = (impl, bias, p_drop, scale, kv_head)
        return o.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, allowed, keep = ctx.saved_tensors
        impl, bias, p_drop, scale, kv_head = ctx.args
        qf, dof = q.float(), do.float()
        s = (qf @ k.transpose(-1, -2)) * scale + (0 if bias is None else bias)
        s = s.masked_fill(~allowed, -math.inf)
        m = s.amax(-1, keepdim=True)
        e = torch.exp(s - torch.where(torch.isinf(m), 0.0, m))  # recomputed from the row max and sum, not
        p = e / e.sum(-1, keepdim=True).clamp_min(1e-38)         # exp(s - lse): that costs |lse| ulps
        if keep is not None and impl.backward_seed_offset:
            keep = impl.other_keep  # regenerates a different mask than the forward used
        z = 1.0 if keep is None else keep.float() / (1 - p_drop)
        dv = (p * z).transpose(-1, -2) @ dof
        dp = (dof @ v.transpose(-1, -2)) * z
        delta = (dof * o.to(q.dtype).float()).sum(-1, keepdim=True) if impl.use_delta else 0.0
        ds = p * (dp - delta)
        if impl.dense_backward_bug and not impl.causal_call:   # the non-causal path skips the last partial block
            cut = k.shape[2] - k.shape[2] % BLOCK
            ds, dv = ds.clone(), dv.clone()
            ds[..., cut:] = 0
            dv[..., cut:, :] = 0
        if impl.nondeterministic_dq:   # key blocks summed in arrival order, as with atomic adds:
            # a different order on every call (rotated by a call count, not drawn from torch's
            # global generator, whose state depends on which tests ran before in the worker)
            blocks = -(-k.shape[2] // BLOCK)
            impl.dq_calls = getattr(impl, "dq_calls", 0) + 1
            order = [(j + impl.dq_calls) % blocks for j in range(blocks)]
            dq = sum(scale * ds[..., j * BLOCK:(j + 1) * BLOCK] @ k[:, :, j * BLOCK:(j + 1) * BLOCK] for j in order)
        else:
            dq = scale * ds @ k
        dk = scale * ds.transpose(-1, -2) @ qf
        hkv = int(kv_head.max()) + 1
        dk_f = torch.zeros((q.shape[0], hkv, *dk.shape[2:]), device=q.device).index_add_(1, kv_head, dk)
        dv_f = torch.zeros((q.shape[0], hkv, *dv.shape[2:]), device=q.device).index_add_(1, kv_head, dv)
        return dq.to(q.dtype), dk_f.to(q.dtype), dv_f.to(q.dtype), None, None, None, None, None, None


def _tf32(x):
    """x rounded to TensorFloat-32 (10 explicit mantissa bits), to nearest."""
    return ((x.view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


class TorchFlash(Implementation):
    """Correct: online softmax over key blocks of 16, P rounded to the input dtype, explicit backward."""
    name = "torch-flash"
    capabilities = Capabilities(lse=False, strided_inputs=True)
    rescale = True
    subtract_max = True
    use_delta = True
    dropout_rescale = True
    backward_seed_offset = 0
    gqa_modulo = False
    drop_partial_block = False
    nan_on_empty_rows = False
    alignment_override = None
    assume_contiguous = False
    accumulate = torch.float32
    tf32_dots = False
    nondeterministic_dq = False
    dense_backward_bug = False


    def forward(self, case, inputs, q, k, v):
        self.causal_call = case.causal
        masking_case = case if self.alignment_override is None else case.replace(
            causal_alignment=self.alignment_override)
        allowed, bias = masking_case.masking(inputs).allowed_and_bias(
            case.batch, case.heads_q, case.seqlen_q, case.seqlen_k, q.device)
        if bias is not None:
            bias = bias.float()
        keep = self.keep_mask(case, q.device)
        if keep is not None and self.backward_seed_offset:
            self.other_keep = philox_keep(case.replace(seed=(case.seed + self.backward_seed_offset) % 2**31), q.device)
        if self.assume_contiguous:  # reads the storage as if it were (B, H, N, D) contiguous
            q, k, v = (t.as_strided(t.shape, t.contiguous().stride()) for t in (q, k, v))
        return _Flash.apply(q, k, v, self, allowed, bias, keep, case.dropout_p, case.softmax_scale)

    def keep_mask(self, case, device):
        """The bundled kernel's dropout mask, from the numpy Philox reference (no Triton call)."""
        return philox_keep(case, device)


def philox_keep(case, device):
    if case.dropout_p == 0:
        return None
    idx = np.meshgrid(*(np.arange(n) for n in (case.batch, case.heads_q, case.seqlen_q, case.seqlen_k)),
                      indexing="ij")
    keep = philox.keep(case.seed, case.dropout_p, *idx, case.heads_q, case.seqlen_q, case.seqlen_k)
    return torch.from_numpy(keep).to(device)


class DropsPartialBlock(TorchFlash):
    """Sequence lengths not a multiple of the block: the last partial key block is skipped."""
    drop_partial_block = True


class WrongCausalAlignment(TorchFlash):
    """Always top-left causal, even when bottom-right is asked for (Nq != Nk)."""
    alignment_override = "top_left"


class NanOnMaskedRows(TorchFlash):
    """0/0 on rows with no allowed key."""
    nan_on_empty_rows = True


class WrongGqaMapping(TorchFlash):
    """Query head h reads K/V head h % Hkv instead of h // (Hq / Hkv)."""
    gqa_modulo = True


class AssumesContiguous(TorchFlash):
    """Ignores strides: a transposed (B, N, H, D) view is read as (B, H, N, D)."""
    assume_contiguous = True


class DropoutMaskDiffersInBackward(TorchFlash):
    """The backward regenerates the dropout mask from another RNG offset."""
    backward_seed_offset = 1


class NoMaxSubtraction(TorchFlash):
    """exp(s) without the running max: overflows at large logits."""
    subtract_max = False


class BackwardIgnoresDelta(TorchFlash):
    """dS = P * dP, forgetting the rowsum(dO * O) term."""
    use_delta = False


class DropoutWithoutRescale(TorchFlash):
    """Dropout keeps scores but forgets the 1/(1-p) rescaling."""
    dropout_rescale = False


class DropoutMaskSharedAcrossHeads(TorchFlash):
    """The dropout RNG offset ignores batch and head (as a 32-bit offset wrapping at 2**32 does for
    the entries past it): every (batch, head) gets the mask of (0, 0)."""

    def keep_mask(self, case, device):
        keep = philox_keep(case.replace(batch=1, heads_q=1, heads_kv=1), device)
        return None if keep is None else keep.expand(case.batch, case.heads_q, -1, -1).contiguous()


class OnlineSoftmaxWithoutRescale(TorchFlash):
    """The running accumulator is not rescaled when the running max grows."""
    rescale = False


class UsesTf32(TorchFlash):
    """float32 inputs multiplied in TensorFloat-32 (torch.backends.cuda.matmul.allow_tf32 left on)."""
    tf32_dots = True


class NondeterministicDq(TorchFlash):
    """dQ summed over key blocks in a different order on every call (atomic adds)."""
    nondeterministic_dq = True


class BackwardWrongWhenDense(TorchFlash):
    """The non-causal backward drops the last partial key block's dK and dV; causal is right."""
    dense_backward_bug = True


class AccumulatesInBf16(TorchFlash):
    """The O accumulator is kept in bfloat16 between key blocks (a precision regression)."""
    accumulate = torch.bfloat16


class MaterializesScores(Bundled):
    """The bundled kernel, plus a full N x N score matrix held during the call (a memory regression)."""

    def forward(self, case, inputs, q, k, v):
        scores = q @ k.repeat_interleave(case.heads_q // case.heads_kv, dim=1).transpose(-1, -2)
        out = super().forward(case, inputs, q, k, v)
        del scores
        return out


class Hangs(TorchFlash):
    """Never returns in time (a deadlocked kernel)."""

    def forward(self, case, inputs, q, k, v):
        import time
        time.sleep(30)
        return super().forward(case, inputs, q, k, v)


class ReturnsWrongShape(TorchFlash):
    """Returns O transposed to (B, N, H, D)."""

    def forward(self, case, inputs, q, k, v):
        return super().forward(case, inputs, q, k, v).transpose(1, 2)


class MutatesInputs(TorchFlash):
    """Scales q in place (then undoes nothing)."""

    def forward(self, case, inputs, q, k, v):
        inputs.q.mul_(1.0 + 2.0**-8) if inputs.q.is_floating_point() else None
        return super().forward(case, inputs, q, k, v)


class DeclinesOddLengths(TorchFlash):
    """Correct, but its kernel declines odd key lengths (impls.Unsupported), as torch's pinned
    SDPA backends decline shapes outside their rules: a narrow kernel, not a broken one."""

    def forward(self, case, inputs, q, k, v):
        if case.seqlen_k % 2:
            raise Unsupported(f"odd key length {case.seqlen_k}: this kernel takes even lengths only")
        return super().forward(case, inputs, q, k, v)


class DeclinesEverything(TorchFlash):
    """Declines every case (a backend this machine cannot run for any input)."""

    def forward(self, case, inputs, q, k, v):
        raise Unsupported("no kernel for this device")
