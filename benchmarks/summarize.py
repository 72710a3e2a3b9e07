"""Print TFLOP/s per config from a pytest-benchmark JSON, with ratios to SDPA backends."""

import json
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    table = defaultdict(dict)
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if "tflops" not in e:
            continue
        key = (e["direction"], e["d"], "causal" if e["causal"] else "dense", e["dtype"].removeprefix("torch."))
        table[key][e["impl"]] = e["tflops"]
    impls = sorted({i for row in table.values() for i in row}, key=lambda s: (s != "flashverify", s))
    print(f"{'dir':4s} {'D':>4s} {'mask':7s} {'dtype':8s}" + "".join(f"{i:>13s}" for i in impls)
          + "".join(f"{'÷' + i:>15s}" for i in impls if i != "flashverify"))
    for key in sorted(table):
        row = table[key]
        ours = row.get("flashverify")
        cells = "".join(f"{row[i]:13.1f}" if i in row else f"{'-':>13s}" for i in impls)
        ratios = "".join(f"{ours / row[i]:15.2f}" if (ours and i in row) else f"{'-':>15s}"
                         for i in impls if i != "flashverify")
        print(f"{key[0]:4s} {key[1]:4d} {key[2]:7s} {key[3]:8s}{cells}{ratios}")


if __name__ == "__main__":
    main(sys.argv[1])
