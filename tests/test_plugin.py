"""The pytest plugin, exercised the way a user runs it: pytest --pyargs flashverify.properties ..."""

import json


def _run(pytester, *args, profile="ci"):
    return pytester.runpytest("-p", "no:cacheprovider", "--pyargs", "flashverify.properties",
                              f"--attn-profile={profile}", *args)


def test_plugin_options_come_from_the_entry_point(pytester):
    result = pytester.runpytest("--help")
    result.stdout.fnmatch_lines(["*--attn-impl=MODULE:CALLABLE*", "*--attn-report=PATH*"])


def test_correct_implementation_passes(pytester):
    result = _run(pytester, "--attn-impl=broken_impls:TorchFlash", "-k", "forward_within or fully_masked")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*flashverify: properties per implementation*", "*PASSED*forward_within_bounds*"])


def test_broken_implementation_fails_with_a_readable_summary(pytester, tmp_path):
    report = tmp_path / "report.json"
    result = _run(pytester, "--attn-impl=broken_impls:NanOnMaskedRows", "--attn-impl=broken_impls:TorchFlash",
                  "-k", "fully_masked", f"--attn-report={report}")
    assert result.ret != 0
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["broken_impls:NanOnMaskedRows",
                                 "*FAILED*fully_masked_rows_give_zero*NaN in the output of a fully masked row*",
                                 "broken_impls:TorchFlash", "*PASSED*fully_masked_rows_give_zero*"])
    data = json.loads(report.read_text())
    from flashverify.golden import source_fingerprint
    assert data["run"]["source"] == source_fingerprint() and data["run"]["of_shards"] == 1
    assert data["run"]["profile"] == "ci"
    failed = [r for r in data["results"] if r["outcome"] == "failed"]
    assert failed[0]["implementation"] == "broken_impls:NanOnMaskedRows"
    assert "example = Case(" in failed[0]["reproducer"]


def test_bad_impl_spec_is_a_usage_error(pytester):
    result = _run(pytester, "--attn-impl=not-a-spec")
    assert result.ret == 4  # pytest's usage-error exit code
    result.stderr.fnmatch_lines(["*--attn-impl must be 'package.module:callable'*"])


def test_unsupported_features_are_skipped_with_reasons(pytester):
    result = _run(pytester, "--attn-impl=flashverify.kernels:sdpa", "-k", "keep_rate", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*does not declare keep_mask*"])


def test_cases_an_implementation_declines_are_skipped_and_counted(pytester):
    """impls.Unsupported (a kernel's own refusal, e.g. torch's 'No available kernel') rejects that
    case, not the property; the summary counts them; declining everything skips with the reason."""
    result = _run(pytester, "--attn-impl=broken_impls:DeclinesOddLengths", "--attn-impl=broken_impls:DeclinesEverything",
                  "-k", "forward_within", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines_random([
        "*PASSED*forward_within_bounds*",
        "*drawn cases declined by the implementation (most often: odd key length*",
        "*SKIPPED*forward_within_bounds*declined * of the cases drawn, accepted 0*no kernel for this device*",
    ])


def test_shards_split_a_property_and_merge_in_the_summary(pytester, tmp_path):
    """--attn-shards K: K tests per property (each 1/K of the examples, its own random stream),
    one line per property in the summary with the most severe outcome of its shards."""
    report = tmp_path / "report.json"
    result = _run(pytester, "--attn-impl=broken_impls:NanOnMaskedRows", "--attn-impl=broken_impls:TorchFlash",
                  "--attn-shards=2", "-k", "fully_masked", f"--attn-report={report}", profile="dev")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines(["*fully_masked_rows_give_zero*shard1of2*", "*fully_masked_rows_give_zero*shard2of2*"])
    lines = [ln for ln in result.stdout.lines if ln.startswith(("  PASSED", "  FAILED"))]  # the summary's
    assert [ln.split()[0] for ln in lines] == ["FAILED", "PASSED"], lines   # one line per property
    records = json.loads(report.read_text())["results"]
    assert sorted((r["implementation"], r["outcome"], r["shards"]) for r in records) == [
        ("broken_impls:NanOnMaskedRows", "failed", [1, 2]), ("broken_impls:TorchFlash", "passed", [1, 2])]
    assert "only shard" not in result.stdout.str()
    partial = _run(pytester, "--attn-impl=broken_impls:TorchFlash", "--attn-shards=3", "-k",
                   "fully_masked and not shard2of3", profile="dev")
    partial.stdout.fnmatch_lines(["*PASSED*fully_masked_rows_give_zero*(only shards 1, 3 of 3 ran)*"])


def test_shards_with_a_derandomized_profile_are_a_usage_error(pytester):
    result = _run(pytester, "--attn-shards=2")
    assert result.ret == 4
    result.stderr.fnmatch_lines(["*--attn-shards 2 needs a random profile*"])


def test_expected_failures_are_declared_and_strict(pytester):
    xfails = pytester.makefile(".txt", xfails="""
        # known: returns NaN on rows with no allowed key
        broken_impls:NanOnMaskedRows fully_masked_rows_give_zero 0/0 on empty rows, fix pending
        broken_impls:TorchFlash fully_masked_rows_give_zero stale declaration
    """)
    result = _run(pytester, "--attn-impl=broken_impls:NanOnMaskedRows", "--attn-impl=broken_impls:TorchFlash",
                  "-k", "fully_masked", f"--attn-xfails={xfails}")
    result.assert_outcomes(xfailed=1, failed=1)  # the stale one passes: strict xfail fails it
    result.stdout.fnmatch_lines(["*XFAIL*fully_masked_rows_give_zero*0/0 on empty rows, fix pending*"])


def test_misbehaving_implementations_are_named_and_the_run_goes_on(pytester):
    # --attn-timeout 5: at 1 s, correct calls timed out on a loaded machine
    result = _run(pytester, "--attn-impl=broken_impls:Hangs", "--attn-impl=broken_impls:ReturnsWrongShape",
                  "--attn-impl=broken_impls:MutatesInputs", "--attn-impl=broken_impls:TorchFlash",
                  "--attn-timeout=5", "-k", "output_shape or inputs_not_mutated")
    result.assert_outcomes(passed=3, failed=5)
    result.stdout.fnmatch_lines_random([
        "*FAILED*output_shape_dtype_device*hung: no result within 5 s*not called again*",
        "*FAILED*output_shape_dtype_device*output has shape*expected*",
        "*FAILED*inputs_not_mutated*q was modified by the call*",
    ])


def test_worked_adapter_example_runs(pytester, monkeypatch):
    """docs/examples/flash_attn_style.py: the adapter documented in docs/adapters.md works as written."""
    import pathlib
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "docs" / "examples"))
    result = _run(pytester, "--attn-impl=flash_attn_style:FlashAttnAdapter", "-k",
                  "forward_within or causal_alignment or fully_masked or dropout_seeds", "-rs")
    result.assert_outcomes(passed=2, skipped=2)
    result.stdout.fnmatch_lines_random(["*flash-attn-style does not declare key_lengths*",
                                        "*flash-attn-style does not declare deterministic_dropout*"])


def test_summary_and_report_survive_pytest_xdist(pytester, tmp_path):
    """With -n N the properties run in workers; the summary and JSON come from the controller."""
    import pathlib

    import pytest
    pytest.importorskip("xdist")
    tests_dir = str(pathlib.Path(__file__).parent)   # workers are new processes: broken_impls must be importable
    pytester.makeconftest(f"import sys\nsys.path.insert(0, {tests_dir!r})\n")
    report = tmp_path / "report.json"
    result = _run(pytester, "-n", "2", "--attn-impl=broken_impls:NanOnMaskedRows", "--attn-impl=broken_impls:TorchFlash",
                  "-k", "fully_masked or forward_within", f"--attn-report={report}")
    result.assert_outcomes(passed=2, failed=2)   # NaN rows also break forward_within_bounds
    result.stdout.fnmatch_lines_random(["*FAILED*fully_masked_rows_give_zero*NaN in the output*",
                                        "*PASSED*forward_within_bounds*worst o error/bound*"])
    records = json.loads(report.read_text())["results"]
    assert len(records) == 4 and {r["outcome"] for r in records} == {"passed", "failed"}
