"""The two floors of attention on this GPU: FLOPs over the measured matmul rate, bytes over the
measured memory bandwidth. Writes them as JSON for summarize.py --floors (GPU only).

Run: python benchmarks/floors.py floors.json
"""

import json
import sys

import torch


def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def main(path):
    rates = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    n = 8192
    for dtype in (torch.float16, torch.bfloat16):
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        rates[f"matmul_tflops_{str(dtype).removeprefix('torch.')}"] = 2 * n**3 / _time(lambda: a @ b) / 1e12
    x = torch.empty(2**30 // 2, device="cuda", dtype=torch.float16)   # 1 GiB, far beyond L2
    y = torch.empty_like(x)
    rates["copy_gbs"] = 2 * x.numel() * 2 / _time(lambda: y.copy_(x)) / 1e9   # read + write
    with open(path, "w") as f:
        json.dump(rates, f, indent=1)
    print(json.dumps(rates, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "floors.json")
