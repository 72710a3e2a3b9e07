"""benchmarks/summarize.py: TFLOP/s and ratios from one or several speed-grid files (pure Python)."""

import importlib.util
import json
import pathlib

_spec = importlib.util.spec_from_file_location(
    "summarize", pathlib.Path(__file__).parents[1] / "benchmarks" / "summarize.py")
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)


def _grid_file(path, tflops_by_impl):
    """A pytest-benchmark JSON of one config (fwd fp16 D=128 dense N=1K) with the given TFLOP/s."""
    info = dict(direction="fwd", dtype="torch.float16", d=128, causal=False, N=1024, B=32, H=16, flops=2.75e11)
    benchmarks = [{"extra_info": dict(info, impl=impl, tflops=t)} for impl, t in tflops_by_impl.items()]
    path.write_text(json.dumps({"machine_info": {"gpu": {"name": "Test GPU"}}, "benchmarks": benchmarks}))
    return str(path)


def _row(out):
    return next(line for line in out.splitlines() if line.startswith("fwd"))


def test_one_file_gives_its_ratios_and_no_spread_column(tmp_path, capsys):
    summarize.main([_grid_file(tmp_path / "a.json", {"flashverify": 300.0, "flex": 400.0})])
    out = capsys.readouterr().out
    assert "runs" not in out
    assert _row(out).split()[-1] == "0.75"


def test_several_files_give_medians_and_the_range_of_ours_over_flex(tmp_path, capsys):
    files = [_grid_file(tmp_path / f"{i}.json", {"flashverify": ours, "flex": 400.0})
             for i, ours in enumerate((300.0, 420.0, 360.0))]
    summarize.main(files)
    out = capsys.readouterr().out
    assert "medians over 3 runs" in out
    cells = _row(out).split()
    assert cells[5:7] == ["360.0", "400.0"]       # each implementation's median over the runs
    assert cells[7] == "0.90"                      # ours/flex of the medians
    assert cells[8] == "0.75-1.05"                 # ours/flex in the worst and the best run
