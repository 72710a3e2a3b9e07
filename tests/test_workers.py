"""--jobs N: cases measured in N processes give the numbers one process gives."""

import json

from flashverify import golden, report
from flashverify.cli import main
from flashverify.impls import load
from flashverify.profiles import profile
from flashverify.workers import Workers

LABELS = ("dense/float16/N64/D64", "key-padding/bfloat16/N64/D64", "dropout/float32/N64/D64")


def test_errors_do_not_depend_on_the_number_of_processes(device):
    cases = {label: profile("cpu")[label] for label in LABELS}
    impl = load("flashverify", device=device)
    with Workers(2, device) as workers:
        parallel = workers.errors("flashverify", impl, cases)
        broken = workers.errors("broken_impls:ReturnsWrongShape", load("broken_impls:ReturnsWrongShape", device),
                                cases)
    assert list(parallel) == list(LABELS)   # in the cases' order, whichever process finished first
    assert parallel == golden.collect_errors(impl, cases, device)
    assert all("output has shape" in e["raised"] for e in broken.values())   # reported, and the run went on


def test_a_search_split_over_processes_is_reproducible(device):
    impl = load("naive", device=device)
    with Workers(2, device) as workers:
        first, again = (workers.worst_case("naive", impl, 4) for _ in range(2))
    assert first["case"] == again["case"] and first["bound_ratio"] == again["bound_ratio"]


def test_rendering_earlier_data_compares_with_the_golden_file_of_their_platform(device, tmp_path):
    """`report --data` re-renders a GPU's measurement on any machine, against that GPU's golden file."""
    data = report.collect(["naive"], device, search_examples=2)
    data["platform"] = "nvidia-h100-80gb-hbm3"   # a golden file the package ships
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(data))
    assert main(["report", "--data", str(path), "--out", str(tmp_path / "r")]) == 0
    assert "| Baseline | nvidia-h100-80gb-hbm3 (flashverify.golden/1) |" in (tmp_path / "r" / "report.md").read_text()
