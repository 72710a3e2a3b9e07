"""Error-bound reports for releases: one measurement, written as Markdown, HTML and JSON.

``flashverify report`` (and the end of ``flashverify verify``) runs a profile against one or
more implementations and writes a directory::

    report.md     for release notes (plots as PNG files beside it)
    report.html   self-contained (plots embedded), the one to look at
    report.json   schema flashverify.report/1: the golden layout plus the sweeps, so a golden
                  file or an older report can be the baseline of the comparison columns

The document is built once as a list of blocks and rendered twice (Markdown, HTML).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from dataclasses import dataclass

from . import golden

SCHEMA = "flashverify.report/1"
TENSORS = ("o", "lse", "dq", "dk", "dv")
# Error-vs-N sweep: dense problems at growing N, per platform kind (the interpreter is slow).
SWEEP = {"cpu": dict(ns=(32, 64, 128, 256), head_dim=32), "cuda": dict(ns=(512, 1024, 2048, 4096, 8192), head_dim=128)}
SEARCH_EXAMPLES = {"cpu": 6, "cuda": 60}


# --- measuring ----------------------------------------------------------------------------------

def collect(specs, device, profile_name=None, search_examples=None, progress_factory=None, jobs=1) -> dict:
    """Everything the report shows, for each implementation spec (JSON-ready); cases and the
    search spread over `jobs` processes (verify.workers)."""
    from .impls import load
    from .profiles import profile
    from .workers import Workers

    kind = golden.device_kind(device)
    profile_name = profile_name or ("gpu" if kind == "cuda" else "cpu")
    cases = profile(profile_name)
    data = {"schema": SCHEMA, "platform": golden.platform_name(device), "environment": golden.environment(device),
            "profile": profile_name, "implementations": {}}
    with Workers(jobs, str(device)) as workers:
        for spec in specs:
            data["implementations"][spec] = _collect_one(spec, load(spec, device=device), device, cases, kind,
                                                         search_examples, progress_factory, workers)
    return data


def _collect_one(spec, impl, device, cases, kind, search_examples, progress_factory, workers) -> dict:
    from .case import Case
    caps = impl.capabilities
    entry = {"capabilities": {"dtypes": list(caps.dtypes), "backward": caps.backward, "lse": caps.lse,
                              "dropout": caps.dropout and caps.keep_mask, "notes": caps.notes}}
    bar = progress_factory(len(cases), f"{spec}: errors") if progress_factory else None
    entry["errors"] = workers.errors(spec, impl, cases, progress=bar)
    entry.update(golden.memory_entry(impl, device))
    sweep = SWEEP[kind]
    entry["error_vs_n"] = {}
    for dtype in ("float16", "bfloat16"):
        if dtype not in caps.dtypes:
            continue
        sweep_cases = {f"N{n}": Case(seqlen_q=n, seqlen_k=n, head_dim=sweep["head_dim"], dtype=dtype)
                       for n in sweep["ns"]}
        errors = workers.errors(spec, impl, sweep_cases)
        if any("raised" in e for e in errors.values()):
            entry["error_vs_n"][dtype] = {"raised": next(e["raised"] for e in errors.values() if "raised" in e)}
            continue
        tensors = [t for t in TENSORS if t in errors[f"N{sweep['ns'][0]}"]]
        entry["error_vs_n"][dtype] = {"n": list(sweep["ns"]), "head_dim": sweep["head_dim"],
                                      **{t: [errors[f"N{n}"][t]["rel_fro"] for n in sweep["ns"]]
                                         for t in tensors},
                                      # the naive low-precision error on the same inputs, for scale
                                      **{f"{t}_naive": [_naive_error(errors[f"N{n}"][t]) for n in sweep["ns"]]
                                         for t in tensors}}
    entry["worst_search_examples"] = search_examples or SEARCH_EXAMPLES[kind]
    entry["worst"] = workers.worst_case(spec, impl, entry["worst_search_examples"])
    return entry


def _naive_error(metrics: dict):
    ratio = metrics["reference_ratio"]
    return metrics["rel_fro"] / ratio if ratio else None


def worst_case(impl, spec, device, examples: int, shard: int | None = None) -> dict | None:
    """A short targeted search (hypothesis.target on error/bound) for the implementation's worst case;
    derandomized, or seeded with `shard` when the search is split over processes."""
    from hypothesis import HealthCheck, given, seed, settings, target

    from .evaluate import evaluate
    from flashverify.properties import strategies as fst
    from .repro import reproducer

    max_seqlen = 1024 if golden.device_kind(device) == "cuda" else 96
    worst = {}

    @settings(max_examples=examples, database=None, deadline=None, derandomize=shard is None,
              suppress_health_check=list(HealthCheck))
    @given(fst.cases(impl.capabilities, max_seqlen=max_seqlen))
    def search(case):
        x = case.inputs(device)
        out = impl.run(case, x, backward=impl.capabilities.backward)
        keep = impl.keep_mask(case, device) if case.dropout_p else None
        check = max(evaluate(case, x, out, keep=keep), key=lambda c: c.bound_ratio)
        target(min(check.bound_ratio, 1e6))
        if check.bound_ratio > worst.get("bound_ratio", -1):
            worst.update(case=repr(case), tensor=check.tensor, bound_ratio=check.bound_ratio,
                         reference_ratio=check.reference_ratio, rel_fro=check.error.rel_fro,
                         reproducer=reproducer(spec, case, device, "worst_case",
                                              title=f"worst case the targeted search found for {spec}"))

    if shard is not None:
        search = seed(shard)(search)
    try:
        search()
    except Exception as e:  # noqa: BLE001 - the report shows what went wrong and goes on
        worst["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    return worst or None


def merge(reports: list[dict]) -> dict:
    """Several report measurements of one platform as one (later implementations win)."""
    if not reports or any(r.get("schema") != SCHEMA for r in reports):
        raise golden.GoldenError("--data takes report.json files written by flashverify report")
    platforms = {r["platform"] for r in reports}
    if len(platforms) > 1:
        raise golden.GoldenError(f"cannot merge reports of different platforms: {sorted(platforms)}")
    merged = dict(reports[0], implementations={})
    for r in reports:
        merged["implementations"].update(r["implementations"])
    return merged


# --- comparing with a baseline ------------------------------------------------------------------

def baseline_verdicts(data: dict, baseline: dict | None) -> dict:
    """(impl, case label, tensor) -> 'regressed' / 'improved' / 'unchanged' against the baseline."""
    if not baseline:
        return {}
    shared = {k: v for k, v in data["implementations"].items() if k in baseline.get("implementations", {})}
    out = {}
    for change in golden.compare(baseline, shared):
        if not change.where.startswith("errors "):
            continue
        _, label, tensor = change.where.split(" ")
        key = (change.implementation, label, tensor)
        rank = {"regressed": 3, "missing": 2, "improved": 1, "unchanged": 0}
        if rank[change.verdict] >= rank.get(out.get(key), -1):
            out[key] = change.verdict
    return out


def load_baseline(path: str) -> dict:
    """A previous report.json or a golden file (same layout under 'implementations')."""
    return golden.read(path, schemas=(SCHEMA, golden.SCHEMA), what="baseline",
                       remedy="pass a report.json written by `flashverify report` or a golden file")


# --- the document -------------------------------------------------------------------------------

@dataclass
class Block:
    kind: str          # heading | text | table | image | code | details
    content: object
    level: int = 2


def _fmt(x, spec=".2e"):
    if x is None:
        return "n/a"
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    return format(x, spec)


def build(data: dict, baseline: dict | None, images: dict) -> list[Block]:
    """The report as blocks; `images` maps plot names to file names."""
    env = data["environment"]
    verdicts = baseline_verdicts(data, baseline)
    blocks = [Block("heading", "flashverify error-bound report", 1),
              Block("table", ([["Platform", data["platform"]], ["Device", env["device"]],
                               ["flashverify", env["flashverify"]], ["torch", env["torch"]],
                               ["triton", env["triton"]], ["Python", env["python"]],
                               ["Case profile", data["profile"]],
                               ["Baseline", baseline.get("platform", "?") + f" ({baseline['schema']})"
                                if baseline else "none"]], ["", ""])),
              Block("text", "Errors are measured against a float64 oracle on the same rounded inputs. "
                            "*bound ratio* = max over elements of |error| / a-priori bound (docs/error-model.md; "
                            "above 1 fails). *naive ratio* = relative error / that of naive attention computed "
                            "in the same low precision (limit 2x forward, 3x backward, judged for fp16/bf16). "
                            "*vs baseline*: the gate's one-sided verdict (errors may grow "
                            f"{golden.ERROR_SLACK:.0%} before they count as regressed). The bound models a flash kernel "
                            "(float32 accumulation, P rounded once): the naive reference, computed entirely in "
                            "low precision, is not expected to meet it.")]
    blocks.append(Block("heading", "Summary: worst over cases, per implementation and dtype"))
    rows = []
    for spec, entry in data["implementations"].items():
        for dtype, tensors in worst_by_dtype(entry["errors"]).items():
            for t, w in tensors.items():
                marks = [verdicts.get((spec, label, t)) for label in w["labels"]]
                rows.append([spec, dtype, t, _fmt(w["max_abs"]), _fmt(w["p99_abs"]), _fmt(w["rmse"]),
                             _fmt(w["max_ulp"], ".1f"), _fmt(w["rel_fro"]), _fmt(w["bound_ratio"], ".3f"),
                             _fmt(w["reference_ratio"], ".2f"), f"{w['passed']}/{len(w['labels'])}",
                             _baseline_cell(marks, baseline)])
    blocks.append(Block("table", (rows, ["implementation", "dtype", "tensor", "max abs", "p99 abs", "RMSE",
                                         "max ULP", "rel. Frobenius", "bound ratio", "naive ratio", "passed",
                                         "vs baseline"])))
    blocks.append(Block("heading", "Memory: peak extra memory against N"))
    mem_rows = []
    for spec, entry in data["implementations"].items():
        if "memory_error" in entry:
            mem_rows.append([spec, "-", "not measured here: " + entry["memory_error"], "", "", "", ""])
        for pass_name, m in entry.get("memory", {}).items():
            mem_rows.append([spec, pass_name, f"{m['exponent']:.3f}", f"{m['residual']:.3f}",
                             f"{m['n'][-1]}", golden.human_bytes(m["peak_bytes"][-1]), f"{m['min_ratio']:.3f}"])
    blocks.append(Block("table", (mem_rows, ["implementation", "pass", "fitted exponent", "fit residual (log2)",
                                             "largest N", "peak there", "peak / physical minimum"])))
    case = next((m["case"] for e in data["implementations"].values() for m in e.get("memory", {}).values()), None)
    if case:
        blocks.append(Block("text", f"Problem: B={case['batch']}, H={case['heads_q']}, D={case['head_dim']}, "
                                    f"{case['dtype']}, causal; Nq = Nk = N. Physical minimum: O and LSE forward; "
                                    "plus dQ, dK, dV and delta with the backward. Exponent: least squares on "
                                    "log-log points."))
    if "memory" in images:
        blocks.append(Block("image", (images["memory"], "Peak extra memory against N, log-log")))
    if "error_vs_n" in images:
        blocks.append(Block("heading", "Error against sequence length"))
        blocks.append(Block("image", (images["error_vs_n"], "Relative error of O and dQ against N")))
    blocks.append(Block("heading", "Worst case found by targeted search"))
    for spec, entry in data["implementations"].items():
        w = entry.get("worst")
        if not w:
            continue
        if "error" in w and "case" not in w:
            blocks.append(Block("text", f"**{spec}**: the search stopped: {w['error']}"))
            continue
        searched = f" in {entry['worst_search_examples']} examples" if "worst_search_examples" in entry else ""
        blocks.append(Block("text", f"**{spec}**: {w['tensor']} at {w['bound_ratio']:.3f} of its bound "
                                    f"(relative error {w['rel_fro']:.2e}, naive ratio "
                                    f"{_fmt(w['reference_ratio'], '.2f')}){searched} on `{w['case']}`"))
        blocks.append(Block("code", w["reproducer"]))
    blocks.append(Block("heading", "Every case"))
    for spec, entry in data["implementations"].items():
        rows = []
        for label, tensors in entry["errors"].items():
            if "raised" in tensors:
                rows.append([label, *[""] * len(TENSORS), "FAIL: " + tensors["raised"], ""])
                continue
            cells = [f"{tensors[t]['rel_fro']:.2e} ({tensors[t]['bound_ratio']:.2f})" if t in tensors else ""
                     for t in TENSORS]
            fails = [f for t in tensors.values() for f in t["failures"]]
            marks = [verdicts.get((spec, label, t)) for t in TENSORS]
            rows.append([label, *cells, "FAIL: " + "; ".join(fails) if fails else "pass",
                         _baseline_cell(marks, baseline)])
        blocks.append(Block("details", (f"{spec}: {len(rows)} cases (relative error (bound ratio))",
                                        (rows, ["case", *TENSORS, "verdict", "vs baseline"]))))
    return blocks


def worst_by_dtype(errors: dict) -> dict:
    """dtype -> tensor -> the worst of each metric over the cases that ran (labels 'feature/dtype/...'),
    with the cases' labels and how many passed."""
    out = {}
    for dtype in ("float16", "bfloat16", "float32"):
        labels = [label for label, t in errors.items() if f"/{dtype}/" in label and "raised" not in t]
        for t in TENSORS:
            have = {label: errors[label][t] for label in labels if t in errors[label]}
            if not have:
                continue
            worst = {m: max(h[m] for h in have.values())
                     for m in ("max_abs", "p99_abs", "rmse", "max_ulp", "rel_fro", "bound_ratio")}
            refs = [h["reference_ratio"] for h in have.values() if h["reference_ratio"] is not None]
            worst.update(reference_ratio=max(refs) if refs else None, labels=list(have),
                         passed=sum(not h["failures"] for h in have.values()))
            out.setdefault(dtype, {})[t] = worst
    return out


def _baseline_cell(marks, baseline) -> str:
    if not baseline:
        return "-"
    for word in ("regressed", "missing", "improved"):
        if word in marks:
            return word
    return "unchanged" if any(m == "unchanged" for m in marks) else "new"


# --- plots --------------------------------------------------------------------------------------

def plots(data: dict) -> dict[str, bytes]:
    """PNG bytes of the memory-scaling and error-vs-N plots (matplotlib, no display needed).
    One colour and hollow marker per implementation in both, the markers shrinking from the first
    implementation on, so that equal results drawn on top of each other stay visible; in the
    error plot the line style tells the dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    entries = data["implementations"]
    look = {spec: dict(color=f"C{i}", marker="osD^vP*X"[i % 8], markersize=max(3.0, 9.0 - 1.5 * i),
                       markerfacecolor="none", markeredgewidth=1.4) for i, spec in enumerate(entries)}
    if any(e.get("memory") for e in entries.values()):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
        for ax, pass_name in zip(axes, ("forward", "forward+backward")):
            minimum = None
            for spec, e in entries.items():
                m = e.get("memory", {}).get(pass_name)
                if not m:
                    continue
                ax.loglog(m["n"], m["peak_bytes"], "-", **look[spec], label=f"{spec} (exponent {m['exponent']:.2f})")
                minimum = m
            if minimum:
                ax.loglog(minimum["n"], minimum["minimum_bytes"], "k--", label="physical minimum")
                _plain_n_ticks(ax, minimum["n"])
            ax.set_title(f"{pass_name}: peak extra memory")
            ax.set_xlabel("sequence length N (Nq = Nk)")
            ax.set_ylabel("bytes")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        out["memory"] = _png(fig, plt)
    sweeps = [(spec, dtype, s) for spec, e in entries.items() for dtype, s in e.get("error_vs_n", {}).items()
              if "raised" not in s]
    if sweeps:
        line = {"float16": "-", "bfloat16": "--"}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
        for ax, tensor in zip(axes, ("o", "dq")):
            drawn = set()
            for spec, dtype, s in sweeps:
                if tensor in s:
                    ax.loglog(s["n"], s[tensor], line[dtype], **look[spec], label=f"{spec} {dtype}")
                naive = s.get(f"{tensor}_naive")
                if "naive" not in entries and naive and None not in naive and dtype not in drawn:
                    drawn.add(dtype)   # the naive low-precision error for scale, once per dtype
                    ax.loglog(s["n"], naive, line[dtype], color="gray", alpha=0.6, label=f"naive {dtype} (reference)")
            _plain_n_ticks(ax, sweeps[0][2]["n"])
            ax.set_title(f"{'O' if tensor == 'o' else 'dQ'}: dense, D={sweeps[0][2]['head_dim']}")
            ax.set_xlabel("sequence length N (Nq = Nk)")
            ax.set_ylabel("relative Frobenius error vs float64")
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncol=min(4, len(labels)), fontsize=8)
        out["error_vs_n"] = _png(fig, plt)
    return out


def _plain_n_ticks(ax, ns):
    from matplotlib.ticker import NullLocator
    ax.set_xticks(ns, [f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n) for n in ns])
    ax.xaxis.set_minor_locator(NullLocator())   # y keeps its minor ticks: labelled when the range is narrow


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# --- rendering ----------------------------------------------------------------------------------

def _md_table(rows, header) -> str:
    esc = lambda c: str(c).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def to_markdown(blocks: list[Block]) -> str:
    parts = []
    for b in blocks:
        if b.kind == "heading":
            parts.append("#" * b.level + " " + b.content)
        elif b.kind == "text":
            parts.append(b.content)
        elif b.kind == "table":
            parts.append(_md_table(*b.content))
        elif b.kind == "image":
            parts.append(f"![{b.content[1]}]({b.content[0]})")
        elif b.kind == "code":
            parts.append("```python\n" + b.content.strip() + "\n```")
        elif b.kind == "details":
            summary, table = b.content
            parts.append(f"<details><summary>{summary}</summary>\n\n{_md_table(*table)}\n\n</details>")
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;
text-align:left}th{background:#f3f3f3}tr:nth-child(even){background:#fafafa}
pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:12px}img{max-width:100%}
td:has(+ td), td{white-space:nowrap}.regressed{color:#b00;font-weight:bold}.improved{color:#070}"""


def _html_table(rows, header) -> str:
    def cell(c):
        c = html.escape(str(c))
        cls = {"regressed": "regressed", "improved": "improved"}.get(c)
        return f'<td class="{cls}">{c}</td>' if cls else f"<td>{c}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _inline(text: str) -> str:
    """The little Markdown the text blocks use: **bold**, *italic*, `code`."""
    import re
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    t = re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def to_html(blocks: list[Block], pngs: dict[str, bytes], files: dict[str, str]) -> str:
    by_file = {files[k]: v for k, v in pngs.items()}
    parts = []
    for b in blocks:
        if b.kind == "heading":
            parts.append(f"<h{b.level}>{html.escape(b.content)}</h{b.level}>")
        elif b.kind == "text":
            parts.append(f"<p>{_inline(b.content)}</p>")
        elif b.kind == "table":
            parts.append(_html_table(*b.content))
        elif b.kind == "image":
            data = base64.b64encode(by_file[b.content[0]]).decode()
            parts.append(f'<img alt="{html.escape(b.content[1])}" src="data:image/png;base64,{data}">')
        elif b.kind == "code":
            parts.append(f"<pre>{html.escape(b.content.strip())}</pre>")
        elif b.kind == "details":
            summary, table = b.content
            parts.append(f"<details><summary>{html.escape(summary)}</summary>{_html_table(*table)}</details>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>flashverify report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")


def write(directory: str, data: dict, baseline: dict | None = None) -> dict[str, str]:
    """Write report.{md,html,json} and the plots into `directory`; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    pngs = plots(data)
    files = {name: f"{name}.png" for name in pngs}
    for name, png in pngs.items():
        with open(os.path.join(directory, files[name]), "wb") as f:
            f.write(png)
    blocks = build(data, baseline, files)
    paths = {"md": os.path.join(directory, "report.md"), "html": os.path.join(directory, "report.html"),
             "json": os.path.join(directory, "report.json")}
    with open(paths["md"], "w") as f:
        f.write(to_markdown(blocks))
    with open(paths["html"], "w") as f:
        f.write(to_html(blocks, pngs, files))
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    return paths
