"""Measured error vs a-priori bound vs naive-reference error, for O and dQ, by dtype and N.

python benchmarks/error_table.py 128 1024 [8192]   (uses the GPU when there is one)
"""

import sys
import time

import torch

from flashverify.case import Case
from flashverify.evaluate import evaluate
from flashverify.impls import BUNDLED


def main(sizes):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU (Triton interpreter)'}; "
          "B=1, H=1, D=64, random normal inputs, dense")
    print(f"{'dtype':9s} {'N':>6s} | {'O error':>9s} {'/bound':>7s} {'naive':>9s} {'÷naive':>7s} | "
          f"{'dQ error':>9s} {'/bound':>7s} {'naive':>9s} {'÷naive':>7s} | {'s':>5s}")
    for dtype in ("float16", "bfloat16", "float32"):
        for n in sizes:
            case = Case(heads_q=1, heads_kv=1, seqlen_q=n, seqlen_k=n, head_dim=64, dtype=dtype)
            t = time.time()
            x = case.inputs(device)
            checks = {c.tensor: c for c in evaluate(case, x, BUNDLED.run(case, x))}
            cells = []
            for name in ("o", "dq"):
                c = checks[name]
                naive = "      n/a" if c.reference_error is None else f"{c.reference_error:9.2e}"
                ratio = "    n/a" if c.reference_ratio is None else f"{c.reference_ratio:7.2f}"
                cells.append(f"{c.error.rel_fro:9.2e} {c.bound_ratio:7.3f} {naive} {ratio}")
            print(f"{dtype:9s} {n:6d} | " + " | ".join(cells) + f" | {time.time() - t:5.1f}")
            del x, checks
            if device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [128, 1024])
