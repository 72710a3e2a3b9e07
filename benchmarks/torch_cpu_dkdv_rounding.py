"""Finding: torch's CPU flash-attention backward rounds dV to the input dtype more than once.

Compares torch's dV with two low-precision simulations and prints the error
against the float64 oracle and the one-rounding a-priori bound (flashverify.bounds):
  1. GQA: dV of each query head is rounded before the sum over the group;
  2. long Nq: dV partial sums are rounded to the input dtype after every 32-query block.
Run: python benchmarks/torch_cpu_dkdv_rounding.py
"""

import warnings

import torch

from flashverify import oracles
from flashverify.bounds import Precision, backward_bounds, forward_bounds
from flashverify.case import Case
from flashverify.impls import load

warnings.simplefilter("ignore")
torch_sdpa = load("sdpa-flash", "cpu")


def exact_and_bound(case, x):
    m, sc = case.masking(x), case.softmax_scale
    fwd = oracles.forward(x.q, x.k, x.v, m, sc, None, 0)
    g = oracles.backward(x.q, x.k, x.v, x.do, m, sc, None, 0, fwd)
    ob, lb, es = forward_bounds(x.q, x.k, x.v, fwd, m, sc, None, 0, Precision(case.dtype))
    return fwd.p, g.dv, backward_bounds(x.q, x.k, x.v, x.do, fwd, g, m, sc, None, 0, Precision(case.dtype),
                                        ob, lb, es)[2]


def dv_rounded(p, do, dt, block, group):
    """P^T dO with P in `dt`, float32 products and sums, partial sums rounded to `dt` after each
    `block` queries and per query head before the GQA group sum."""
    nq = p.shape[2]
    acc = torch.zeros(p.shape[0], p.shape[1], p.shape[3], do.shape[3])
    for s in range(0, nq, block):
        part = p[:, :, s:s + block].to(dt).float().transpose(-1, -2) @ do[:, :, s:s + block].float()
        acc = (acc + part).to(dt).float()
    B, H = acc.shape[:2]
    return acc.view(B, H // group, group, *acc.shape[2:]).sum(2).to(dt)


for label, case, block in [
    ("GQA, one query (Hq=2, Hkv=1)", Case(heads_q=2, heads_kv=1, seqlen_q=1, seqlen_k=2, head_dim=16), 32),
    ("Nq=50 bf16, large logits", Case(batch=2, heads_q=1, heads_kv=1, seqlen_q=50, seqlen_k=50, head_dim=72,
                                      dtype="bfloat16", seed=50, distribution="large_logits", layout="bnhd"), 32),
]:
    x = case.inputs("cpu")
    p, dv_exact, bound = exact_and_bound(case, x)
    got = torch_sdpa.run(case, x).dv
    group = case.heads_q // case.heads_kv
    sim = dv_rounded(p, x.do, case.torch_dtype, block, group)
    once = dv_rounded(p, x.do, case.torch_dtype, case.seqlen_q, 1).double() if group == 1 else None
    ratio = lambda t: ((t.double() - dv_exact).abs() / bound).max().item()  # noqa: E731
    same = (sim == got).double().mean().item()
    print(f"{label}: dV error/bound: torch {ratio(got):.3f}, simulation {ratio(sim):.3f} (equal to torch's "
          f"dV in {same:.0%} of elements)" + (f", rounded once {ratio(once):.3f}" if once is not None else ""))
