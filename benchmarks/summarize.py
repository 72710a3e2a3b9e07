"""TFLOP/s per config from a pytest-benchmark JSON, with ratios to the other implementations and,
given floors.json (benchmarks/floors.py), the time floor and how far above it each run is.

Run: python benchmarks/summarize.py bench.json [--floors floors.json]
Floor of one config = max(FLOPs / matmul rate, bytes / copy bandwidth), bytes = the tensors that must
cross HBM once (forward: Q, K, V read, O written, LSE; backward: Q, K, V, O, dO read, dQ, dK, dV
written, LSE and delta).
"""

import argparse
import json
from collections import defaultdict


def bytes_moved(e):
    esize = 2
    qkvo = e["B"] * e["H"] * e["N"] * e["d"] * esize
    rows = e["B"] * e["H"] * e["N"] * 4
    return 4 * qkvo + rows if e["direction"] == "fwd" else 8 * qkvo + 2 * rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bench")
    ap.add_argument("--floors", default=None)
    args = ap.parse_args()
    data = json.load(open(args.bench))
    floors = json.load(open(args.floors)) if args.floors else None
    table, info = defaultdict(dict), {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if "tflops" not in e:
            continue
        dtype = e["dtype"].removeprefix("torch.")
        key = (e["direction"], dtype, e["d"], "causal" if e["causal"] else "dense", e["N"])
        table[key][e["impl"]] = e["tflops"]
        info[key] = e
    impls = sorted({i for row in table.values() for i in row}, key=lambda s: (s != "flashverify", s))
    others = [i for i in impls if i != "flashverify"]
    print(f"GPU: {data.get('machine_info', {}).get('gpu', {}).get('name', '?')}; TFLOP/s (FlashAttention-2 FLOPs)")
    head = f"{'dir':4s} {'dtype':9s} {'D':>4s} {'mask':7s} {'N':>6s}" + "".join(f"{i:>15s}" for i in impls)
    head += "".join(f"{'ours/' + i:>21s}" for i in others)
    if floors:
        head += f"{'floor ms':>10s}{'ours/floor':>11s}"
    print(head)
    for key in sorted(table):
        row, e = table[key], info[key]
        ours = row.get("flashverify")
        line = f"{key[0]:4s} {key[1]:9s} {key[2]:4d} {key[3]:7s} {key[4]:6d}"
        line += "".join(f"{row[i]:15.1f}" if i in row else f"{'-':>15s}" for i in impls)
        line += "".join(f"{ours / row[i]:21.2f}" if (ours and i in row) else f"{'-':>21s}" for i in others)
        if floors:
            rate = floors[f"matmul_tflops_{key[1]}"] * 1e12
            floor = max(e["flops"] / rate, bytes_moved(e) / (floors["copy_gbs"] * 1e9))
            took = e["flops"] / (ours * 1e12) if ours else None
            line += f"{floor * 1e3:10.3f}" + (f"{took / floor:11.2f}" if took else f"{'-':>11s}")
        print(line)


if __name__ == "__main__":
    main()
