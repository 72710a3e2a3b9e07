"""Command line: ``flashverify verify`` runs the bundled kernel against the oracles and bounds."""

from __future__ import annotations

import argparse
import json
import sys
import time

TENSORS = ("o", "lse", "dq", "dk", "dv")


def _fmt_ratio(x):
    return "  n/a" if x is None else f"{x:5.2f}"


def cmd_verify(args) -> int:
    import torch

    import flashverify.kernels as kernels
    from .evaluate import evaluate
    from .impls import BUNDLED
    from .profiles import profile

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not kernels.interpreting():
        print("error: --device cpu needs TRITON_INTERPRET=1 set before start-up", file=sys.stderr)
        return 2
    name = args.profile or ("gpu" if device == "cuda" else "cpu")
    cases = profile(name)
    mode = "Triton interpreter (CPU)" if kernels.interpreting() else torch.cuda.get_device_name()
    print(f"flashverify: bundled Triton kernel on {mode}, profile '{name}', {len(cases)} cases")
    print("Each cell: relative Frobenius error | measured / a-priori bound | ratio to the naive "
          "low-precision reference (limit 2x fwd, 3x bwd; fp32: reported only)\n")
    header = f"{'case':44s}" + "".join(f"{t:>27s}" for t in TENSORS) + "  verdict"
    print(header)
    records, failed = [], 0
    start = time.time()
    for label, case in cases.items():
        inputs = case.inputs(device)
        out = BUNDLED.run(case, inputs)
        checks = evaluate(case, inputs, out, keep=BUNDLED.keep_mask(case, device))
        by_name = {c.tensor: c for c in checks}
        cells = []
        for t in TENSORS:
            c = by_name[t]
            cells.append(f"{c.error.rel_fro:9.2e} |{c.bound_ratio:5.2f} |{_fmt_ratio(c.reference_ratio)}")
        reasons = [r for c in checks for r in c.failures]
        failed += bool(reasons)
        print(f"{label:44s}" + "".join(f"{c:>27s}" for c in cells) + ("  PASS" if not reasons else "  FAIL"))
        for r in reasons:
            print(f"    {r}")
        records.append({"name": label, "case": case.as_dict(), "passed": not reasons, "failures": reasons,
                        "checks": {c.tensor: {**c.error.as_dict(), "bound_ratio": c.bound_ratio,
                                              "reference_ratio": c.reference_ratio} for c in checks}})
    print(f"\nSummary ({time.time() - start:.0f} s): worst over cases, per dtype and tensor "
          "(relative error / bound ratio / naive ratio)")
    for dtype in ("float16", "bfloat16", "float32"):
        rows = [r for r in records if r["case"]["dtype"] == dtype]
        if not rows:
            continue
        parts = []
        for t in TENSORS:
            rel = max(r["checks"][t]["rel_fro"] for r in rows)
            b = max(r["checks"][t]["bound_ratio"] for r in rows)
            refs = [r["checks"][t]["reference_ratio"] for r in rows if r["checks"][t]["reference_ratio"] is not None]
            parts.append(f"{t} {rel:.1e}/{b:.2f}/{max(refs):.2f}" if refs else f"{t} {rel:.1e}/{b:.2f}/n/a")
        print(f"  {dtype:9s} " + "   ".join(parts))
    print(f"\n{len(records) - failed} passed, {failed} failed")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"profile": name, "device": mode, "cases": records}, f, indent=1)
        print(f"results written to {args.json}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashverify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="verify the bundled Triton kernel and print an error-bound summary")
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    v.add_argument("--profile", choices=("cpu", "gpu"), default=None,
                   help="case list (default: by device)")
    v.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    v.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
