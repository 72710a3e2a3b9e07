"""Compile the bundled kernel for every case of the 'gpu' case profile in parallel processes (GPU only).

Triton caches compiled kernels on disk, and each feature x dtype x head dim of the profile is its
own specialization (four kernels each): compiled one after another inside `flashverify golden
update` or `flashverify report`, compiling takes most of their time. Run this first; they then
find every kernel in the cache. Run: python benchmarks/warm_cache.py
"""

import multiprocessing as mp
import os
import sys
import time


def _labels():
    from flashverify.profiles import profile
    return list(profile("gpu"))


def _warm(label):
    from flashverify import golden
    from flashverify.impls import load
    from flashverify.profiles import profile
    golden.collect_errors(load("flashverify", device="cuda"), {label: profile("gpu")[label]}, "cuda")
    return label


if __name__ == "__main__":
    import torch
    if not torch.cuda.is_available():
        sys.exit("warm_cache.py compiles the bundled kernel for a GPU: no CUDA device here")
    start = time.time()
    labels = _labels()
    with mp.get_context("spawn").Pool(min(14, os.cpu_count() or 1)) as pool:
        for _ in pool.imap_unordered(_warm, labels):
            pass
    print(f"warmed {len(labels)} cases in {time.time() - start:.0f} s")
