"""TFLOP/s per config from pytest-benchmark JSON files, with ratios to the other implementations and,
given floors.json (benchmarks/floors.py), the time floor and how far above it each run is.

Run: python benchmarks/summarize.py bench.json [bench2.json ...] [--floors floors.json] [--back-to-back]
     python benchmarks/summarize.py bench.json --background   (CPU the host's background used during each test)
Several files (the same grid run more than once, minutes or sessions apart): each config's TFLOP/s
is the median over the files, and a column gives the range of ours/FlexAttention over them. Why:
at N=1K a block of rounds (one config and implementation, about a second) can sit 0.1-0.25 ms
above the kernel's time as a whole, so more rounds in one block do not remove the noise, and
medians over blocks run apart do (docs/performance.md, session 12).
Floor of one config = max(FLOPs / matmul rate, bytes / copy bandwidth), bytes = the tensors that must
cross HBM once (forward: Q, K, V read, O written, LSE; backward: Q, K, V, O, dO read, dQ, dK, dV
written, LSE and delta).
"""

import argparse
import json
import statistics
from collections import defaultdict

TARGET = "flex"   # issue 8: the bundled kernel must be at least as fast as FlexAttention


def bytes_moved(e):
    esize = 2
    qkvo = e["B"] * e["H"] * e["N"] * e["d"] * esize
    rows = e["B"] * e["H"] * e["N"] * 4
    return 4 * qkvo + rows if e["direction"] == "fwd" else 8 * qkvo + 2 * rows


def _runs(paths, rate="tflops"):
    """[{config key: {impl: TFLOP/s}}] per file, the configs' extra_info, and the GPU names;
    rate: the extra_info entry to read (tflops: call + synchronize; tflops_back_to_back)."""
    runs, info, gpus = [], {}, []
    for path in paths:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"bench {path!r}: not a readable pytest-benchmark JSON file ({e})") from None
        gpus.append(data.get("machine_info", {}).get("gpu", {}).get("name", "?"))
        table = defaultdict(dict)
        for b in data["benchmarks"]:
            e = b["extra_info"]
            if "tflops" not in e:
                continue
            if rate not in e:
                raise SystemExit(f"{path}: no {rate!r} in its results (a grid from before it was measured)")
            dtype = e["dtype"].removeprefix("torch.")
            key = (e["direction"], dtype, e["d"], "causal" if e["causal"] else "dense", e["N"])
            table[key][e["impl"]] = e[rate]
            info[key] = e
        runs.append(table)
    return runs, info, gpus


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("bench", nargs="+", help="pytest-benchmark JSON files of the speed grid")
    ap.add_argument("--floors", default=None)
    ap.add_argument("--back-to-back", action="store_true",
                    help="calls queued back to back (larger of host and GPU time per call), not call + synchronize")
    ap.add_argument("--background", action="store_true",
                    help="the CPU seconds the process's descendants (inductor's compile workers) used while each test "
                         "timed, instead of TFLOP/s")
    args = ap.parse_args(argv)
    if args.background and (args.back_to_back or args.floors):
        ap.error("--background lists CPU seconds: give it without --back-to-back and --floors")
    rate = "background_cpu_s" if args.background else "tflops_back_to_back" if args.back_to_back else "tflops"
    runs, info, gpus = _runs(args.bench, rate)
    floors = json.load(open(args.floors)) if args.floors else None
    table = {key: {impl: statistics.median(r[key][impl] for r in runs if impl in r.get(key, {}))
                   for impl in {i for r in runs for i in r.get(key, {})}}
             for key in info}
    impls = sorted({i for row in table.values() for i in row}, key=lambda s: (s != "flashverify", s))
    others = [i for i in impls if i != "flashverify"] if not args.background else []
    spread = len(runs) > 1 and TARGET in others
    names = ", ".join(sorted(set(gpus)))
    what = ("CPU s of descendant processes during each test" if args.background
            else "TFLOP/s (FlashAttention-2 FLOPs), " + ("calls back to back" if args.back_to_back
                                                         else "each call + synchronize"))
    print(f"GPU: {names}; {what}" + (f"; medians over {len(runs)} runs" if len(runs) > 1 else ""))
    head = f"{'dir':4s} {'dtype':9s} {'D':>4s} {'mask':7s} {'N':>6s}" + "".join(f"{i:>15s}" for i in impls)
    head += "".join(f"{'ours/' + i:>21s}" for i in others)
    if spread:
        head += f"{'ours/' + TARGET + ' runs':>22s}"
    if floors:
        head += f"{'floor ms':>10s}{'ours/floor':>11s}"
    print(head)
    for key in sorted(table):
        row, e = table[key], info[key]
        ours = row.get("flashverify")
        line = f"{key[0]:4s} {key[1]:9s} {key[2]:4d} {key[3]:7s} {key[4]:6d}"
        line += "".join(f"{row[i]:15.{2 if args.background else 1}f}" if i in row else f"{'-':>15s}" for i in impls)
        line += "".join(f"{ours / row[i]:21.2f}" if (ours and i in row) else f"{'-':>21s}" for i in others)
        if spread:
            ratios = [r[key]["flashverify"] / r[key][TARGET] for r in runs
                      if "flashverify" in r.get(key, {}) and TARGET in r.get(key, {})]
            line += f"{min(ratios):17.2f}-{max(ratios):.2f}" if ratios else f"{'-':>22s}"
        if floors:
            rate = floors[f"matmul_tflops_{key[1]}"] * 1e12
            floor = max(e["flops"] / rate, bytes_moved(e) / (floors["copy_gbs"] * 1e9))
            took = e["flops"] / (ours * 1e12) if ours else None
            line += f"{floor * 1e3:10.3f}" + (f"{took / floor:11.2f}" if took else f"{'-':>11s}")
        print(line)


if __name__ == "__main__":
    main()
