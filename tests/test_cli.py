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


def test_search_examples_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", "--search-examples", "0"])
    assert exit_.value.code == 2 and "must be a whole number >= 1, got 0" in capsys.readouterr().err


def test_missing_xfails_file_is_a_usage_error(pytester):
    result = pytester.runpytest("-p", "no:cacheprovider", "--pyargs", "flashverify.properties",
                                "--attn-xfails=/no/such/xfails.txt")
    assert result.ret == 4   # pytest's usage-error status
    result.stderr.fnmatch_lines(["*--attn-xfails: no such file '/no/such/xfails.txt'*"])
