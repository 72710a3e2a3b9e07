"""The command line: bad input is one clear line on stderr and exit status 2, never a traceback."""

import pytest
import torch

from flashverify.cli import main


@pytest.mark.parametrize("argv, message", [
    (["report", "--impl", "bogus"], "error: --impl: an implementation is 'package.module:callable' or a built-in name"),
    (["report", "--impl", "no_such_module:fn"], "error: --impl: cannot load attention implementation 'no_such_module:fn'"),
    (["golden", "check", "--impl", "bogus"], "error: --impl: an implementation is"),
    (["report", "--data", "/no/such/report.json"], "error: no baseline /no/such/report.json"),
    (["report", "--impl", "naive", "--compare", "/no/such/report.json"], "error: no baseline /no/such/report.json"),
])
def test_bad_input_is_a_clear_error(argv, message, capsys, device):
    assert main([*argv, "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and "Traceback" not in err


def test_a_golden_file_is_not_report_data(capsys, device):
    from flashverify import golden
    path = golden.path_for(golden.platform_name(device))
    if not __import__("os").path.exists(path):
        pytest.skip("no golden file for this platform")
    assert main(["report", "--data", path, "--device", device]) == 2
    assert "--data takes report.json files" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu(capsys):
    assert main(["verify", "--device", "cuda"]) == 2
    assert "--device cuda: torch" in capsys.readouterr().err


@pytest.mark.parametrize("argv,shown", [(["report", "--search-examples", "0"], "got 0"),
                                        (["verify", "--jobs", "0"], "got 0"),
                                        (["golden", "check", "--jobs", "two"], "got 'two'")])
def test_counts_must_be_positive_whole_numbers(argv, shown, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"{argv[-2]}: must be a whole number >= 1, {shown}" in err


def test_missing_xfails_file_is_a_usage_error(pytester):
    result = pytester.runpytest("-p", "no:cacheprovider", "--pyargs", "flashverify.properties",
                                "--attn-xfails=/no/such/xfails.txt")
    assert result.ret == 4   # pytest's usage-error status
    result.stderr.fnmatch_lines(["*--attn-xfails: no such file '/no/such/xfails.txt'*"])


def _record(prop, outcome, shard, of, ratio=None):
    return {"implementation": "k", "property": prop, "outcome": outcome, "detail": "", "reproducer": None,
            "worst_bound_ratio": ratio, "worst_tensor": "o" if ratio else None, "worst_case": None,
            "declined": {"odd": 1}, "shards": [shard], "of_shards": of}


_RUN = {"profile": "release", "of_shards": 2, "max_seqlen": 512, "environment": {"device": "gpu"}, "source": "abc"}


def _write_report(path, results, **run):
    import json
    path.write_text(json.dumps({"schema": "flashverify.property-report/2", "run": {**_RUN, **run},
                                "results": results}))
    return path


def test_merge_properties_joins_shards_of_separate_runs(tmp_path, capsys):
    """A release run split over machines: the verdict needs every shard of every property."""
    import json
    runs = [[_record("a", "passed", 1, 2, 0.5), _record("b", "passed", 1, 2)],
            [_record("a", "passed", 2, 2, 0.7), _record("b", "failed", 2, 2)]]
    paths = [_write_report(tmp_path / f"run{i}.json", results) for i, results in enumerate(runs)]
    assert main(["merge-properties", str(paths[0]), "--out", str(tmp_path / "m.json")]) == 1
    assert "(only shard 1 of 2 ran)" in capsys.readouterr().out
    assert main(["merge-properties", *map(str, paths), "--out", str(tmp_path / "m.json")]) == 1   # b failed
    out = capsys.readouterr().out
    assert "PASSED   k  a  worst o error/bound 0.7\n" in out and "FAILED   k  b" in out and "only" not in out
    merged = {r["property"]: r for r in json.loads((tmp_path / "m.json").read_text())["results"]}
    assert merged["a"]["shards"] == [1, 2] and merged["a"]["declined"] == {"odd": 2}
    assert main(["merge-properties", str(tmp_path / "nope.json")]) == 2
    assert "reports: cannot read" in capsys.readouterr().err


def test_merge_properties_refuses_reports_of_different_sources_or_machines(tmp_path, capsys):
    """Shards run against two versions of the kernel (or on two GPU models) are not one verdict."""
    ours = _write_report(tmp_path / "a.json", [_record("a", "passed", 1, 2)])
    edited = _write_report(tmp_path / "b.json", [_record("a", "passed", 2, 2)], source="def")
    assert main(["merge-properties", str(ours), str(edited)]) == 2
    assert "differ in source ('def' vs 'abc')" in capsys.readouterr().err
    elsewhere = _write_report(tmp_path / "c.json", [_record("a", "passed", 2, 2)], environment={"device": "cpu"})
    assert main(["merge-properties", str(ours), str(elsewhere)]) == 2
    assert "differ in environment" in capsys.readouterr().err
    old = tmp_path / "old.json"
    old.write_text('{"schema": "flashverify.property-report/1", "results": []}')
    assert main(["merge-properties", str(old)]) == 2
    assert "expected 'flashverify.property-report/2'" in capsys.readouterr().err
