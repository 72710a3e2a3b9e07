"""Named lists of cases for the main job (``flashverify verify``): one per machine size."""

from __future__ import annotations

from .case import Case


def _features(n: int, d: int, dtype: str) -> dict[str, Case]:
    """Every feature of the bundled kernel at sequence length ~n (never a multiple of a block)."""
    n1, n2 = n + 5, n + n // 2 + 3
    return {
        "dense": Case(seqlen_q=n1, seqlen_k=n2, head_dim=d, dtype=dtype),
        "causal": Case(seqlen_q=n1, seqlen_k=n1, head_dim=d, dtype=dtype, causal=True),
        "causal-bottom-right": Case(seqlen_q=n1, seqlen_k=n2, head_dim=d, dtype=dtype, causal=True,
                                    causal_alignment="bottom_right"),
        "window": Case(seqlen_q=n1, seqlen_k=n1, head_dim=d, dtype=dtype, window=(n // 4, n // 8)),
        "key-padding": Case(batch=2, seqlen_q=n1, seqlen_k=n2, head_dim=d, dtype=dtype,
                            key_lengths=(0, n2 // 2)),
        "bool-mask": Case(seqlen_q=n1, seqlen_k=n2, head_dim=d, dtype=dtype, mask="bool"),
        "additive-mask": Case(seqlen_q=n1, seqlen_k=n2, head_dim=d, dtype=dtype, mask="additive",
                              mask_broadcast=True),
        "gqa": Case(heads_q=4, heads_kv=2, seqlen_q=n1, seqlen_k=n2, head_dim=d, dtype=dtype, causal=True),
        "dropout": Case(seqlen_q=n1, seqlen_k=n2, head_dim=d, dtype=dtype, dropout_p=0.2, seed=7),
        "outliers": Case(seqlen_q=n1, seqlen_k=n2, head_dim=d, dtype=dtype, distribution="outliers"),
    }


def profile(name: str) -> dict[str, Case]:
    """Cases of profile `name`: 'cpu' (interpreter-sized, ~1 min) or 'gpu'."""
    dtypes = ("float16", "bfloat16", "float32")
    if name == "cpu":
        sizes = [(64, 64)]
    elif name == "gpu":
        sizes = [(512, 64), (2048, 128)]
    else:
        raise ValueError(f"profile must be one of 'cpu', 'gpu', got {name!r}")
    cases = {}
    for n, d in sizes:
        for dtype in dtypes:
            for feature, case in _features(n, d, dtype).items():
                cases[f"{feature}/{dtype}/N{n}/D{d}"] = case
    return cases
