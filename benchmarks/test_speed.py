"""Speed of the bundled kernel against torch's attention kernels, in one process (GPU only).

Grid (issue 8): fp16 and bf16, D in {64, 128}, dense and causal, N in {1K, 4K, 16K} (B = 32K / N
sequences of H = 16 heads, so every N does the same number of tokens), forward and backward;
implementations: flashverify, SDPA flash / efficient / cuDNN, FlexAttention (compiled).

Run: python benchmarks/test_speed.py [-k fp16] [-k "fp16 and D128 and N1K"] (compiles the grid's Triton and FlexAttention
kernels in parallel processes: compiling is not timed, and the timed run then finds them in the
disk caches), pytest benchmarks/test_speed.py --benchmark-json=bench.json, then
python benchmarks/summarize.py bench.json [--floors floors.json] for TFLOP/s and ratios.
FLOPs follow FlashAttention-2: forward 4 B H N^2 D (halved when causal), backward 2.5x that.
Two times per config: the benchmark's own, each call followed by a synchronize (one call's
latency, host time included), and, in extra_info, back to back (timing.back_to_back_ms: calls
queued with one synchronize per batch, the larger of host and GPU time per call, as
FlashAttention's benchmarks time); `summarize.py --back-to-back` tabulates the second.
GPU name, torch and triton versions are saved in the JSON's machine_info (benchmarks/conftest.py).
"""

import contextlib
import math
import time

import pytest
import torch
import torch._inductor.config
import torch.nn.functional as F

from timing import back_to_back_ms, descendants

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks run on a GPU only")


@contextlib.contextmanager
def compiling_in_process():
    """Inductor compiles in this process, without its pool of compile workers, until the block
    ends. Why: FlexAttention's first call starts that pool (a sidecar process, then one worker
    per core up to 32), and the workers start up while the tests after it time: 0.9-1.1 CPU s of
    them during FlexAttention's own test and three or four of the next config's, and the bundled
    kernel, first there, ran that config (the N=1K D=64 causal forward) at 0.97 (fp16) and 0.86
    (bf16) of FlexAttention by call + synchronize, 1.03-1.04 back to back (H200, session 15:
    extra_info.background_cpu_s). The pool's start is a one-time cost of whichever test follows
    FlexAttention's first call; FlexAttention's kernels come from the disk cache that the
    compile step below fills, so nothing is compiled while timing either way. Only the grid's
    tests run so: process_context.py imports this module and times with the pool."""
    threads = torch._inductor.config.compile_threads
    torch._inductor.config.compile_threads = 1
    try:
        yield
    finally:
        torch._inductor.config.compile_threads = threads


@pytest.fixture(autouse=True, scope="module")
def _grid_compiles_in_process():
    with compiling_in_process():
        yield


TOKENS, H = 32768, 16


def _ours(q, k, v, causal):
    from flashverify.kernels import attention
    return attention(q, k, v, causal=causal)


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


_flex_state = {}


def _flex(q, k, v, causal):
    """FlexAttention as users run it: compiled for each shape (flashverify.adapters), with a block
    mask for causal (masked blocks skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from flashverify.adapters import compiled_flex_attention
    block_mask = None
    if causal:
        key = (q.shape[2], k.shape[2])
        if key not in _flex_state:
            _flex_state[key] = create_block_mask(lambda b, h, i, j: i >= j, None, None, *key, device=q.device)
        block_mask = _flex_state[key]
    return compiled_flex_attention()(q, k, v, block_mask=block_mask)


IMPLS = {"flashverify": _ours, "sdpa-flash": _sdpa("FLASH_ATTENTION"), "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION"),
         "sdpa-cudnn": _sdpa("CUDNN_ATTENTION"), "flex": _flex}


def _inputs(b, n, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(b, H, n, d, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3)]


def forward_call(fn, q, k, v, causal):
    """The forward as the grid times it: no graph recorded (inference), output dropped."""
    def call():
        with torch.no_grad():
            fn(q, k, v, causal)
    return call


def gradients(o, inputs, do):
    """dQ, dK, dV alone, as the grid times a backward. o.backward() would also add them into each
    input's .grad: three elementwise kernels, the same for every implementation, which pull
    every ratio toward 1 (11 % of the CUDA time of a D=64, N=1K backward on the H200)."""
    return torch.autograd.grad(o, inputs, do, retain_graph=True)


WARMUP_S, TIMED_S, MIN_ROUNDS = 0.3, 0.5, 10


def _rounds(step):
    """(warm-up rounds, timed rounds) lasting WARMUP_S and TIMED_S of calls, at least MIN_ROUNDS
    timed. Why by time, not count: at N=1K a call takes under 1 ms, so 2 warm-up and 10 timed
    rounds were 12 ms of calls, after each config's set-up, for ratios that moved between two grid
    runs by up to 0.44 (H200, docs/performance.md, sessions 10-11)."""
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    once = min(times)
    return max(2, math.ceil(WARMUP_S / once)), max(MIN_ROUNDS, math.ceil(TIMED_S / once))


def flops(b, n, d, causal, direction):
    f = 4.0 * b * H * n * n * d / (2 if causal else 1)
    return f * (2.5 if direction == "bwd" else 1.0)


NS, CAUSAL, DS, DTYPES = (1024, 4096, 16384), (False, True), (64, 128), (torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def n_id(n):
    return f"N{n // 1024}K"


# Order: the implementation varies fastest, the sequence length slowest.
# * impl fastest: a config's implementations run one after another, seconds apart. Run
#   implementation by implementation, the grid timed the bundled kernel and FlexAttention minutes
#   apart, so each ratio also carried the machine's drift in between (docs/performance.md,
#   session 10).
# * N slowest: with N varying second fastest, every N=1K config ran right after the previous
#   config's N=16K tests, and the first implementation timed there (ours) ran slow for the whole
#   test: fp16 D=128 dense N=1K forward 0.946 ms in the grid, 0.747 ms in a run of that config
#   alone on the next instance, with the other implementations less slowed the later they ran
#   (sdpa-flash +9 %, sdpa-efficient +7 %, cuDNN +4 %, FlexAttention, last, 0 %; H200, session
#   13, cause not measured). Now the N=1K configs run first and each N=16K config follows another.
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("causal", CAUSAL, ids=["dense", "causal"])
@pytest.mark.parametrize("d", DS, ids=["D64", "D128"])
@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[t] for t in DTYPES])
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("n", NS, ids=[n_id(n) for n in NS])
def test_speed(benchmark, impl, direction, dtype, d, causal, n):
    b = TOKENS // n
    q, k, v = _inputs(b, n, d, dtype)
    fn = IMPLS[impl]
    try:
        o = fn(q, k, v, causal)
    except RuntimeError as e:  # a backend torch does not offer on this GPU/build
        pytest.skip(f"{impl} unavailable: {str(e)[:200]}")
    do = torch.randn_like(o)
    if direction == "fwd":
        call = forward_call(fn, q, k, v, causal)
    else:
        def call():
            gradients(o, (q, k, v), do)

    def step():
        call()
        torch.cuda.synchronize()
    warmup_rounds, rounds = _rounds(step)
    _, cpu_before = descendants()
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    back_to_back = back_to_back_ms(call) / 1e3
    processes, cpu_after = descendants()
    f = flops(b, n, d, causal, direction)
    benchmark.extra_info.update(impl=impl, direction=direction, d=d, causal=causal, dtype=str(dtype), B=b, H=H,
                                N=n, flops=f, tflops=f / benchmark.stats["median"] / 1e12,
                                back_to_back_s=back_to_back, tflops_back_to_back=f / back_to_back / 1e12,
                                # the host's background while this test timed (a lower bound: processes
                                # that ended meanwhile drop out): inductor's compile workers, session 14
                                background_processes=processes, background_cpu_s=max(0.0, cpu_after - cpu_before),
                                inductor_compile_threads=torch._inductor.config.compile_threads)


def compiled_configs(expression=""):
    """The (impl, dtype, d, causal, n) configs to compile first: ours and FlexAttention's (Triton,
    compiled per shape) matching a -k expression, an "and" of words such as "fp16 and D128"."""
    words = expression.replace(" and ", " ").split()
    return [(impl, dtype, d, causal, n) for impl in ("flashverify", "flex") for dtype in DTYPES for d in DS
            for causal in CAUSAL for n in NS
            if all(w in (DTYPE_IDS[dtype], f"D{d}", "causal" if causal else "dense", n_id(n)) for w in words)]


def _compile_one(config):
    """Run one grid config forward and backward once: fills Triton's and inductor's disk caches."""
    impl, dtype, d, causal, n = config
    q, k, v = _inputs(TOKENS // n, n, d, dtype)
    try:   # a dense dO, as the timed backward (.sum()'s expanded gradient has zero strides: other kernels)
        o = IMPLS[impl](q, k, v, causal)
        o.backward(torch.randn_like(o))
    except RuntimeError as e:
        return f"{config}: {str(e)[:120]}"
    return None


def compiled_shapes(argv, default, dtype=torch.float16):
    """(D, N, causal) from command-line triples D N CAUSAL (else `default`, a flat list of them),
    FlexAttention's kernels (of `dtype`) compiled for each first in spawned workers, as the grid compiles.
    Why workers: compiled in the caller's process, FlexAttention's backward kept donated buffers
    and refused a second retain_graph=True call (H200, session 19)."""
    if len(argv) % 3 or not all(x.isdigit() for x in argv):
        raise SystemExit(f"arguments: triples D N CAUSAL of whole numbers (CAUSAL 0 or 1), got {argv}")
    args = [int(x) for x in argv] or list(default)
    shapes = [(args[i], args[i + 1], bool(args[i + 2])) for i in range(0, len(args), 3)]
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(min(len(shapes), 14)) as pool:
        for problem in pool.imap_unordered(_compile_one, [("flex", dtype, d, c, n) for d, n, c in shapes]):
            if problem:
                print(problem)
    return shapes


if __name__ == "__main__":
    import multiprocessing as mp
    import os
    import sys

    if not torch.cuda.is_available():
        sys.exit("test_speed.py compiles the grid's kernels for a GPU: no CUDA device here")
    configs = compiled_configs(sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else "")
    if not configs:
        sys.exit(f"-k {sys.argv[sys.argv.index('-k') + 1]!r} matches no config (an 'and' of fp16/bf16, D64/D128,"
                 " dense/causal, N1K/N4K/N16K)")
    start = time.time()
    with mp.get_context("spawn").Pool(min(14, os.cpu_count() or 1)) as pool:
        problems = [p for p in pool.imap_unordered(_compile_one, configs) if p]
    print(f"compiled {len(configs)} configs in {time.time() - start:.0f} s" + "".join(f"\n  {p}" for p in problems))
