"""Command line: ``flashverify verify`` runs the bundled kernel against the oracles and bounds."""

from __future__ import annotations

import argparse
import os
import sys
import time

TENSORS = ("o", "lse", "dq", "dk", "dv")


def _fmt_ratio(x):
    return "  n/a" if x is None else f"{x:5.2f}"


def cmd_verify(args) -> int:
    """The main job: the bundled kernel on the machine's case profile, a console summary, a report."""
    from . import report

    device = _device(args.device)
    baseline = _baseline(args, device)   # before measuring: a bad --compare fails at once
    data = report.collect(["flashverify"], device, args.profile, progress_factory=Progress, jobs=args.jobs)
    errors = data["implementations"]["flashverify"]["errors"]
    print(f"flashverify: bundled Triton kernel on {data['environment']['device']}, profile '{data['profile']}', "
          f"{len(errors)} cases")
    print("Each cell: relative Frobenius error | measured / a-priori bound | ratio to the naive "
          "low-precision reference (limit 2x fwd, 3x bwd; fp32: reported only)\n")
    print(f"{'case':44s}" + "".join(f"{t:>27s}" for t in TENSORS) + "  verdict")
    failed = 0
    for label, tensors in errors.items():
        if "raised" in tensors:
            failed += 1
            print(f"{label:44s}  FAIL: {tensors['raised']}")
            continue
        cells = [f"{c['rel_fro']:9.2e} |{c['bound_ratio']:5.2f} |{_fmt_ratio(c['reference_ratio'])}"
                 for c in (tensors[t] for t in TENSORS)]
        reasons = [r for c in tensors.values() for r in c["failures"]]
        failed += bool(reasons)
        print(f"{label:44s}" + "".join(f"{c:>27s}" for c in cells) + ("  PASS" if not reasons else "  FAIL"))
        for r in reasons:
            print(f"    {r}")
    print("\nSummary: worst over cases, per dtype and tensor (relative error / bound ratio / naive ratio)")
    for dtype, tensors in report.worst_by_dtype(errors).items():
        print(f"  {dtype:9s} " + "   ".join(
            f"{t} {w['rel_fro']:.1e}/{w['bound_ratio']:.2f}/"
            + ("n/a" if w["reference_ratio"] is None else f"{w['reference_ratio']:.2f}")
            for t, w in tensors.items()))
    for pass_name, m in data["implementations"]["flashverify"].get("memory", {}).items():
        print(f"  memory {pass_name}: exponent {m['exponent']:.3f} in N, {m['min_ratio']:.3f}x the physical "
              f"minimum at N={m['n'][-1]}")
    print(f"\n{len(errors) - failed} passed, {failed} failed")
    paths = report.write(args.report, data, baseline)
    print(f"Report: {paths['html']} (also {os.path.basename(paths['md'])}, {os.path.basename(paths['json'])})")
    return 1 if failed else 0


def _baseline(args, device=None, platform=None):
    """--compare PATH, else the golden file of this platform (the device's, or the data's) if there is one."""
    from . import golden, report
    if getattr(args, "compare", None):
        return report.load_baseline(args.compare)
    path = golden.path_for(platform or golden.platform_name(device))
    return golden.read(path) if os.path.exists(path) else None


def cmd_report(args) -> int:
    from . import report
    if args.data:  # re-render (and merge) earlier measurements, from any machine: no device needed
        data = report.merge([report.load_baseline(p) for p in args.data])
        baseline = _baseline(args, platform=data["platform"])
    else:
        device = _device(args.device)
        baseline = _baseline(args, device)
        data = report.collect(args.impl or ["flashverify"], device, args.profile, args.search_examples,
                              progress_factory=Progress, jobs=args.jobs)
    paths = report.write(args.out, data, baseline)
    print(f"Report: {paths['html']}\n        {paths['md']}\n        {paths['json']}")
    return 0


def cmd_merge_properties(args) -> int:
    """Property reports (--attn-report) of runs that each ran some shards, as one: a release run
    split over CI jobs or machines. Exit 1 if any property failed or any shard is missing."""
    import json

    from .plugin import PROPERTY_REPORT_SCHEMA, coverage, merge_records, summary_line, write_property_report
    merged, run, first = {}, None, None
    for path in args.reports:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f"reports: cannot read {path}: {e}") from e
        if data.get("schema") != PROPERTY_REPORT_SCHEMA:
            raise UsageError(f"reports: {path} is not a property report (--attn-report) of this flashverify: "
                             f"schema {data.get('schema')!r}, expected {PROPERTY_REPORT_SCHEMA!r}")
        if run is None:
            run, first = data["run"], path
        elif data["run"] != run:
            differ = sorted(k for k in run.keys() | data["run"].keys() if run.get(k) != data["run"].get(k))
            raise UsageError(f"reports: {path} and {first} differ in {', '.join(differ)} "
                             f"({data['run'].get(differ[0])!r} vs {run.get(differ[0])!r}): one verdict needs "
                             "one source, profile, shard count and machine")
        for r in data["results"]:
            key = (r["implementation"], r["property"])
            merged[key] = merge_records(merged[key], r) if key in merged else r
    bad = 0
    for (spec, prop), r in sorted(merged.items()):
        bad += r["outcome"] in ("failed", "xpassed") or bool(coverage(r))
        print(summary_line(f"{spec}  {prop}", r))
    if args.out:
        write_property_report(args.out, list(merged.values()), run)
    print(f"{len(merged)} properties from {len(args.reports)} reports; {bad} failed or incomplete")
    return 1 if bad else 0


class UsageError(Exception):
    """Bad command-line input: printed as 'error: ...' with exit status 2."""


def _device(arg) -> str:
    import torch

    import flashverify.kernels as kernels
    device = arg if arg != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: torch {torch.__version__} sees no CUDA device here (use --device cpu)")
    if device == "cpu" and not kernels.interpreting():
        raise UsageError("--device cpu needs TRITON_INTERPRET=1 set before start-up")
    return device


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text}")
    return value


def _jobs_option(parser):
    parser.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                        help="measure cases in N processes (compiling kernels dominates a GPU run: use "
                             "about the number of CPU cores); results do not depend on N (default: 1)")


class Progress:
    """A one-line progress bar on stderr (plain lines when stderr is not a terminal)."""

    def __init__(self, total: int, what: str):
        self.total, self.done, self.what, self.start = total, 0, what, time.time()
        self.tty = sys.stderr.isatty()

    def __call__(self, label: str = ""):
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = (f"{self.what} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{time.time() - self.start:4.0f} s  {label}")
        if self.tty:
            print("\r" + line[:120].ljust(120), end="" if self.done < self.total else "\n", file=sys.stderr,
                  flush=True)
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(line, file=sys.stderr, flush=True)


def measure(impls, device, with_errors=True, with_memory=True, jobs=1) -> dict:
    """Fresh golden-layout results for each loaded implementation (impls.load), keyed by its
    spec, on this machine's case profile."""
    from . import golden
    from .profiles import profile
    from .workers import Workers

    cases = profile("gpu" if golden.device_kind(device) == "cuda" else "cpu") if with_errors else None
    out = {}
    with Workers(jobs, device) as workers:
        for impl in impls:
            spec = impl.spec
            out[spec] = {}
            if cases:
                out[spec]["errors"] = workers.errors(spec, impl, cases, Progress(len(cases), f"{spec} errors"))
            if with_memory:
                out[spec].update(golden.memory_entry(impl, device))
            if "memory_error" in out[spec]:
                print(f"{spec}: memory not measurable here: {out[spec]['memory_error']}", file=sys.stderr)
    return out


def cmd_golden(args) -> int:
    from . import golden
    from .impls import load

    device = _device(args.device)
    platform = golden.platform_name(device)
    path = golden.path_for(platform, args.golden_dir)
    named = [load(spec, device=device) for spec in args.impl or []]   # a bad --impl is named before any file
    if args.action == "check":
        try:
            ref = golden.read(path)
        except golden.GoldenError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.as_name and len(args.impl or ref["implementations"]) != 1:
            print("error: --as needs exactly one --impl", file=sys.stderr)
            return 2
        impls = named or [load(spec, device=device) for spec in sorted(ref["implementations"])]
        measured = {name for name in ("errors", "memory") if any(name in e for e in ref["implementations"].values())}
        fresh = measure(impls, device, "errors" in measured, "memory" in measured, args.jobs)
        try:
            changes = golden.compare(ref, fresh, {impls[0].spec: args.as_name} if args.as_name else None)
        except golden.GoldenError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        bad = [c for c in changes if c.verdict in ("regressed", "missing")]
        better = [c for c in changes if c.verdict == "improved"]
        print(f"golden gate: {path}\n{len(changes)} metrics: {len(bad)} regressed, {len(better)} improved, "
              f"{len(changes) - len(bad) - len(better)} unchanged (slack: errors {golden.ERROR_SLACK:.0%}, "
              f"memory {golden.MEMORY_SLACK:.0%}, exponent {golden.EXPONENT_SLACK})")
        for c in bad:
            print(f"  REGRESSED  {c}")
        for c in better:
            print(f"  improved   {c}")
        if better and not bad:
            print("improvements: record them with `flashverify golden update`")
        return 1 if bad else 0
    # update
    try:
        old = golden.read(path)
    except golden.GoldenError as e:
        if os.path.exists(path) and not args.force:
            print(f"error: {e}\n(pass --force to overwrite it)", file=sys.stderr)
            return 2
        old = None
    fresh = measure(named or [load(spec, device=device) for spec in ("flashverify", "naive")], device, jobs=args.jobs)
    new = {"schema": golden.SCHEMA, "platform": platform, "environment": golden.environment(device),
           "implementations": {**(old["implementations"] if old else {}), **fresh}}
    lines = golden.diff(old, new)
    print(f"golden update: {path}")
    for line in lines or ["no gated metric changed beyond its slack"]:
        print(f"  {line}")
    golden.write(path, new)
    print("written; review with `git diff` and commit it")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="flashverify", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="verify the bundled Triton kernel and print an error-bound summary")
    v.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    v.add_argument("--profile", choices=("cpu", "gpu"), default=None,
                   help="case list (default: by device)")
    v.add_argument("--report", metavar="DIR", default="flashverify-report",
                   help="where to write the report (default: ./flashverify-report)")
    v.add_argument("--compare", metavar="PATH", help="baseline: an older report.json or a golden file "
                   "(default: this platform's golden file)")
    _jobs_option(v)
    v.set_defaults(func=cmd_verify)
    r = sub.add_parser("report", help="write an error-bound report (Markdown, HTML, JSON) for implementations")
    r.add_argument("--impl", action="append", default=[], metavar="SPEC",
                   help="implementation(s) to report on, as for --attn-impl (default: flashverify)")
    r.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    r.add_argument("--profile", choices=("cpu", "gpu"), default=None, help="case list (default: by device)")
    r.add_argument("--search-examples", type=_positive_int, default=None,
                   help="examples of the targeted worst-case search (default: 6 on the CPU, 60 on a GPU)")
    r.add_argument("--out", metavar="DIR", default="flashverify-report")
    r.add_argument("--compare", metavar="PATH", help="baseline: an older report.json or a golden file "
                   "(default: this platform's golden file)")
    r.add_argument("--data", action="append", default=[], metavar="REPORT_JSON",
                   help="render from earlier report.json files (merged in order) instead of measuring")
    _jobs_option(r)
    r.set_defaults(func=cmd_report)
    g = sub.add_parser("golden", help="the golden-result gate: check a fresh run against golden/, or update it")
    g.add_argument("action", choices=("check", "update"))
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--impl", action="append", default=[], metavar="SPEC",
                   help="implementation(s) to measure (default: check: those in the golden file; "
                        "update: flashverify and naive)")
    g.add_argument("--as", dest="as_name", metavar="NAME",
                   help="check: hold the one --impl to the golden entry NAME (e.g. a candidate build)")
    g.add_argument("--golden-dir", default=None, help="directory of the golden files (default: the package's)")
    g.add_argument("--force", action="store_true", help="update: overwrite a corrupt golden file")
    _jobs_option(g)
    g.set_defaults(func=cmd_golden)
    m = sub.add_parser("merge-properties", help="merge property reports (--attn-report) of runs over parts "
                       "of the shards (--attn-shards) into one verdict")
    m.add_argument("reports", nargs="+", metavar="REPORT_JSON")
    m.add_argument("--out", metavar="PATH", help="write the merged report here")
    m.set_defaults(func=cmd_merge_properties)
    args = parser.parse_args(argv)
    from .golden import GoldenError
    from .impls import ImplementationNotFound
    try:
        return args.func(args)
    except ImplementationNotFound as e:
        print(f"error: --impl: {e}", file=sys.stderr)
    except (UsageError, GoldenError) as e:
        print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
