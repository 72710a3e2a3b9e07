"""Relative Frobenius errors vs float64 of the bundled kernel and torch SDPA backends (same inputs).

python benchmarks/accuracy.py [N] [D]  (GPU): random normal fp16 inputs, B=1, H=8.
"""

import sys

import torch
import torch.nn.functional as F

from flashverify import oracles
from flashverify.kernels import attention
from flashverify.metrics import tensor_error


def run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def main(n=2048, d=128, causal=False):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, 8, n, d, device="cuda", generator=g).half() for _ in range(4))
    fwd = oracles.forward(q, k, v, oracles.Masking(causal=causal))
    grads = oracles.backward(q, k, v, do, oracles.Masking(causal=causal), fwd=fwd)
    refs = (fwd.o, grads.dq, grads.dk, grads.dv)

    def sdpa(backend):
        def fn(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return fn

    impls = {"flashverify": lambda q, k, v: attention(q, k, v, causal=causal),
             "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa-cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
             "sdpa-math": sdpa(SDPBackend.MATH)}
    print(f"N={n} D={d} fp16 causal={causal}: relative Frobenius error vs float64")
    print(f"{'impl':12s}" + "".join(f"{t:>10s}" for t in ("O", "dQ", "dK", "dV")))
    for name, fn in impls.items():
        try:
            outs = run(fn, q, k, v, do)
        except RuntimeError as e:
            print(f"{name:12s} unavailable: {str(e)[:60]}")
            continue
        print(f"{name:12s}" + "".join(f"{tensor_error(x, r).rel_fro:10.2e}" for x, r in zip(outs, refs)))


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    main(*args)
    main(*args, causal=True)
