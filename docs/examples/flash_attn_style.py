"""Worked example: an adapter for a FlashAttention-style kernel (docs/adapters.md).

`flash_attn_func` below stands in for your kernel. It has the interface of the
`flash-attn` package: (B, N, H, D) tensors, causal masks aligned bottom-right, a sliding
window as (left, right) with -1 for unbounded, and the log-sum-exp on request. (Here it
calls flashverify's own kernel; replace it with an import of yours.)

    pytest --pyargs flashverify.properties --attn-impl=flash_attn_style:FlashAttnAdapter
(with this directory on PYTHONPATH)
"""

from flashverify.impls import Capabilities, Implementation


def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1), softmax_scale=None, return_lse=False):
    """Stand-in for your kernel: q (B, Nq, H, D), k/v (B, Nk, Hkv, D) -> out (B, Nq, H, D) [, lse (B, H, Nq)]."""
    from flashverify.kernels import attention
    left, right = (None if w < 0 else w for w in window_size)
    window = None if (left, right) == (None, None) else (left, right)
    out, lse = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                         causal_alignment="bottom_right", window=window, scale=softmax_scale, return_lse=True)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


class FlashAttnAdapter(Implementation):
    """What the kernel supports, declared once; properties needing anything else are skipped."""
    name = "flash-attn-style"
    capabilities = Capabilities(
        dtypes=("float16", "bfloat16"),
        causal_alignments=("bottom_right",),   # flash-attn >= 2.1 aligns causal masks bottom-right
        window=True,
        key_lengths=False, masks=(),           # varlen and arbitrary masks: not in this interface
        dropout=False, keep_mask=False, deterministic_dropout=False,
        lse=True, head_dims=(8, 256),
    )
    # Known limitations, reported as XFAIL with the reason: {"property_name": "why"}
    expected_failures = {}

    def forward(self, case, inputs, q, k, v):
        """Convert the case (B, H, N, D tensors, flashverify's masking fields) into the kernel's call."""
        left, right = case.window if case.window is not None else (None, None)
        window = (-1 if left is None else left, -1 if right is None else right)
        out, lse = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=case.causal,
                                   window_size=window, softmax_scale=case.scale, return_lse=True)
        return out.transpose(1, 2), lse
