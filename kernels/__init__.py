"""The bundled Triton FlashAttention-2 kernel (forward and backward).

On a machine without CUDA, Triton's interpreter is switched on *before* the
kernels are defined (Triton reads ``TRITON_INTERPRET`` when a function is
decorated), so the same source runs on the CPU through numpy.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .attention import (  # noqa: E402
    MAX_HEAD_DIM,
    SUPPORTED_DTYPES,
    attention,
    default_config,
    dropout_mask,
    interpreting,
    sdpa,
)

__all__ = ["attention", "sdpa", "dropout_mask", "interpreting", "default_config",
           "SUPPORTED_DTYPES", "MAX_HEAD_DIM"]
