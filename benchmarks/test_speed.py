"""Speed of the bundled kernel vs torch SDPA backends, in one process (GPU only).

Run: pytest benchmarks/test_speed.py --benchmark-json=bench.json, then
python benchmarks/summarize.py bench.json for TFLOP/s and ratios to SDPA.
FLOPs follow FlashAttention-2: forward 4 B H N^2 D (halved when causal), backward 2.5x that.
"""

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks run on a GPU only")

B, H, N = 2, 16, 16384


def _ours(q, k, v, causal):
    from flashverify.kernels import attention
    return attention(q, k, v, causal=causal)


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


IMPLS = {"flashverify": _ours, "sdpa-flash": _sdpa("FLASH_ATTENTION"), "sdpa-cudnn": _sdpa("CUDNN_ATTENTION")}


def _inputs(d, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(B, H, N, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3)]


def _flops(d, causal, direction):
    f = 4.0 * B * H * N * N * d / (2 if causal else 1)
    return f * (2.5 if direction == "bwd" else 1.0)


@pytest.mark.parametrize("dtype", [torch.float16], ids=["fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_speed(benchmark, impl, direction, d, causal, dtype):
    q, k, v = _inputs(d, dtype)
    fn = IMPLS[impl]
    try:
        o = fn(q, k, v, causal)
    except RuntimeError as e:  # a backend torch does not offer on this GPU/build
        pytest.skip(f"{impl} unavailable: {e}")
    do = torch.randn_like(o)
    if direction == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v, causal)
            torch.cuda.synchronize()
    else:
        def step():
            o.backward(do, retain_graph=True)
            torch.cuda.synchronize()
    step()
    benchmark.pedantic(step, rounds=10, warmup_rounds=2, iterations=1)
    flops = _flops(d, causal, direction)
    benchmark.extra_info.update(impl=impl, direction=direction, d=d, causal=causal, dtype=str(dtype),
                                B=B, H=H, N=N, flops=flops, tflops=flops / benchmark.stats["median"] / 1e12,
                                gpu=torch.cuda.get_device_name())
