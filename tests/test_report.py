"""Error-bound reports: one measurement written as Markdown, HTML (plots embedded) and JSON."""

import copy
import json

import pytest

from flashverify import golden, report
from flashverify.cli import main


@pytest.fixture(scope="module")
def naive_data(device):
    """A full report measurement of the naive reference (fast on any machine)."""
    return report.collect(["naive"], device, search_examples=3)


def test_report_files_and_their_content(naive_data, tmp_path):
    paths = report.write(str(tmp_path), naive_data)
    md = open(paths["md"]).read()
    for heading in ("# flashverify error-bound report", "## Summary", "## Memory", "## Error against sequence length",
                    "## Worst case found by targeted search", "## Every case"):
        assert heading in md
    assert "![Peak extra memory against N, log-log](memory.png)" in md
    assert (tmp_path / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = open(paths["html"]).read()
    assert html.count("data:image/png;base64,") == 2 and "<table>" in html
    data = json.load(open(paths["json"]))
    assert data["schema"] == report.SCHEMA and data["environment"]["torch"]
    naive = data["implementations"]["naive"]
    assert naive["memory"]["forward+backward"]["exponent"] > 1.5       # O(N^2), measured
    assert "from flashverify.case import Case" in naive["worst"]["reproducer"]


def test_comparison_columns_name_regressions_and_improvements(naive_data):
    baseline = copy.deepcopy(naive_data)
    first = next(iter(baseline["implementations"]["naive"]["errors"]))
    tensors = baseline["implementations"]["naive"]["errors"][first]
    tensors["o"]["rel_fro"] /= 2            # the baseline was better here: now a regression
    last = list(baseline["implementations"]["naive"]["errors"])[-1]
    baseline["implementations"]["naive"]["errors"][last]["o"]["rel_fro"] *= 2   # and worse here
    verdicts = report.baseline_verdicts(naive_data, baseline)
    assert verdicts[("naive", first, "o")] == "regressed"
    assert verdicts[("naive", last, "o")] == "improved"
    md = report.to_markdown(report.build(naive_data, baseline, {}))
    assert "regressed" in md and "improved" in md


def test_a_golden_file_is_a_valid_baseline(naive_data, tmp_path):
    path = tmp_path / "g.json"
    golden.write(str(path), {"schema": golden.SCHEMA, "platform": "x",
                             "implementations": {"naive": {"errors": naive_data["implementations"]["naive"]["errors"]}}})
    verdicts = report.baseline_verdicts(naive_data, report.load_baseline(str(path)))
    assert set(verdicts.values()) == {"unchanged"}


def test_report_cli(tmp_path, capsys, device):
    assert main(["report", "--impl", "naive", "--device", device, "--search-examples", "2", "--jobs", "2",
                 "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "report.html" in out and (tmp_path / "r" / "report.md").exists()


def test_an_implementation_that_raises_is_reported_and_the_report_goes_on(tmp_path, device):
    data = report.collect(["broken_impls:ReturnsWrongShape"], device, search_examples=2)
    errors = data["implementations"]["broken_impls:ReturnsWrongShape"]["errors"]
    assert all("output has shape" in e["raised"] for e in errors.values())
    md = report.to_markdown(report.build(data, None, {}))
    assert "FAIL: " in md and "output has shape" in md


def test_main_job_passes_and_points_at_its_report(tmp_path, capsys, device):
    """`flashverify verify` (the README's main command) on this machine's profile: every case
    passes, the summary is printed, and the report it points at compares clean with the golden."""
    out_dir = tmp_path / "main-job"
    assert main(["verify", "--device", device, "--report", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "0 failed" in printed and f"Report: {out_dir}/report.html" in printed
    md = (out_dir / "report.md").read_text()
    assert "| flashverify | float16 | o |" in md
    if "| Baseline | none |" not in md:          # this platform has a golden file: nothing regressed
        assert "| regressed |" not in md and "| unchanged |" in md
