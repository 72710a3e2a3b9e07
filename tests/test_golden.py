"""The golden-result gate: memory measurement, golden files, and regressions it must stop."""

import json
import os

import pytest
import torch

import broken_impls
from flashverify import golden
from flashverify.case import Case
from flashverify.cli import main
from flashverify.impls import Bundled, Naive
from flashverify.memory import fit_exponent, peak_extra_bytes, physical_minimum


def test_committed_golden_for_this_platform_holds(device, capsys):
    """The release gate itself (CI: the CPU interpreter's golden; the gpu tox env: the GPU's)."""
    path = golden.path_for(golden.platform_name(device))
    if not os.path.exists(path):
        pytest.skip(f"no golden file for this platform ({path})")
    assert main(["golden", "check", "--device", device]) == 0, capsys.readouterr().out


def test_memory_of_the_bundled_kernel_is_linear_and_near_the_minimum(device):
    base = golden.memory_base(device).replace(seqlen_q=96, seqlen_k=96)
    for backward in (False, True):
        small = peak_extra_bytes(Bundled(), base, device, backward)
        large = peak_extra_bytes(Bundled(), base.replace(seqlen_q=192, seqlen_k=192), device, backward)
        assert small > 0
        assert large == pytest.approx(2 * small, rel=0.02)   # O(N): twice N, twice the memory
        assert small / physical_minimum(base, backward) < 1.2


def test_memory_of_naive_attention_is_quadratic(device):
    base = golden.memory_base(device)
    peaks = [peak_extra_bytes(Naive(), base.replace(seqlen_q=n, seqlen_k=n), device, True) for n in (128, 256, 512)]
    exponent, _ = fit_exponent((128, 256, 512), peaks)
    assert 1.8 < exponent < 2.1


def test_fit_exponent_recovers_a_power_law():
    ns = (64, 128, 256, 512)
    slope, residual = fit_exponent(ns, [3 * n**1.5 for n in ns])
    assert slope == pytest.approx(1.5) and residual == pytest.approx(0, abs=1e-9)


def test_physical_minimum_matches_the_h100_anchor():
    """Issue 6's anchor: B=1, H=8, D=64, fp16, N=16K, forward+backward: 65 MB (MiB)."""
    case = Case(batch=1, heads_q=8, heads_kv=8, seqlen_q=16384, seqlen_k=16384, head_dim=64, dtype="float16")
    assert physical_minimum(case, True) / 2**20 == pytest.approx(65, abs=0.5)


def test_a_variant_that_materializes_scores_fails_the_memory_gate(device):
    ref = golden.read(golden.path_for(golden.platform_name(device))) if os.path.exists(
        golden.path_for(golden.platform_name(device))) else None
    if ref is None or "memory" not in ref["implementations"].get("flashverify", {}):
        pytest.skip("no memory golden for this platform")
    ns = ref["implementations"]["flashverify"]["memory"]["forward"]["n"][:2]
    fresh = {"candidate": {"memory": golden.collect_memory(broken_impls.MaterializesScores(), device, ns)}}
    ref["implementations"]["flashverify"]["memory"] = {
        k: {**m, "n": m["n"][:2], "peak_bytes": m["peak_bytes"][:2]} for k, m in
        ref["implementations"]["flashverify"]["memory"].items()}
    regressed = [c for c in golden.compare(ref, fresh, {"candidate": "flashverify"}) if c.verdict == "regressed"]
    assert regressed
    text = "\n".join(map(str, regressed))
    assert "memory forward N=" in text and "peak_bytes" in text and "%) regressed" in text


FP16_CASES = {f"dense/N{n}": Case(seqlen_q=n, seqlen_k=n + 7, head_dim=32, dtype="float16") for n in (40, 80)}


def test_bf16_accumulation_fails_the_error_gate():
    ref = {"schema": golden.SCHEMA, "implementations": {
        "torch-flash": {"errors": golden.collect_errors(broken_impls.TorchFlash(), FP16_CASES, "cpu")}}}
    same = {"torch-flash": {"errors": golden.collect_errors(broken_impls.TorchFlash(), FP16_CASES, "cpu")}}
    assert {c.verdict for c in golden.compare(ref, same)} == {"unchanged"}
    worse = {"torch-flash": {"errors": golden.collect_errors(broken_impls.AccumulatesInBf16(), FP16_CASES, "cpu")}}
    regressed = [c for c in golden.compare(ref, worse) if c.verdict == "regressed"]
    assert any(c.where.endswith(" o") and c.metric == "rel_fro" and c.fresh > 2 * c.golden for c in regressed)
    assert "%) regressed" in str(regressed[0])


def test_improvements_pass_and_are_reported():
    ref = {"schema": golden.SCHEMA, "implementations": {
        "torch-flash": {"errors": golden.collect_errors(broken_impls.AccumulatesInBf16(), FP16_CASES, "cpu")}}}
    better = {"torch-flash": {"errors": golden.collect_errors(broken_impls.TorchFlash(), FP16_CASES, "cpu")}}
    verdicts = {c.verdict for c in golden.compare(ref, better)}
    assert "improved" in verdicts and "regressed" not in verdicts


def test_update_diff_names_what_changed():
    old = {"schema": golden.SCHEMA, "implementations": {
        "torch-flash": {"errors": golden.collect_errors(broken_impls.TorchFlash(), FP16_CASES, "cpu")}}}
    new = {"schema": golden.SCHEMA, "implementations": {
        "torch-flash": {"errors": golden.collect_errors(broken_impls.AccumulatesInBf16(), FP16_CASES, "cpu")},
        "other": {}}}
    lines = golden.diff(old, new)
    assert any("rel_fro" in line and "regressed" in line for line in lines)
    assert "other: added" in lines
    assert golden.diff(None, new) == ["new golden file: other, torch-flash"]


def test_write_is_atomic_and_readable(tmp_path):
    path = str(tmp_path / "p.json")
    data = {"schema": golden.SCHEMA, "implementations": {"x": {}}}
    golden.write(path, data)
    assert golden.read(path) == data
    assert os.listdir(tmp_path) == ["p.json"]   # no temporary left behind


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    (json.dumps({"schema": "flashverify.golden/0", "implementations": {}}), "has schema 'flashverify.golden/0'"),
    (json.dumps([1, 2]), "has schema 'list'"),
    (json.dumps({"schema": golden.SCHEMA}), "has no 'implementations'"),
])
def test_corrupt_or_foreign_golden_files_are_clear_errors(tmp_path, content, message, device, capsys):
    path = tmp_path / f"{golden.platform_name(device)}.json"
    path.write_text(content)
    with pytest.raises(golden.GoldenError, match=message):
        golden.read(str(path))
    assert main(["golden", "check", "--device", device, "--golden-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err
    assert main(["golden", "update", "--device", device, "--golden-dir", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err


def test_missing_golden_file_says_how_to_create_it(tmp_path, device, capsys):
    assert main(["golden", "check", "--device", device, "--golden-dir", str(tmp_path)]) == 2
    assert "flashverify golden update" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares the CPU tracker with the CUDA allocator")
def test_cpu_tracker_agrees_with_the_cuda_allocator():
    """The CPU measurement is sound: on the same code it sees what CUDA's allocator sees."""
    from flashverify import memory
    case = Case(batch=1, heads_q=4, heads_kv=4, seqlen_q=1024, seqlen_k=1024, head_dim=64, dtype="float16")
    for impl in (Naive(), Bundled()):
        for backward in (False, True):
            cuda_peak = peak_extra_bytes(impl, case, "cuda", backward)
            x = case.inputs("cuda")
            q, k, v = (t.detach().clone().requires_grad_(backward) for t in (x.q, x.k, x.v))
            tracker = memory._AllocationTracker()
            with tracker:
                r = memory._forward_backward(impl, case, x, q, k, v, backward)
            del r
            assert tracker.peak == pytest.approx(cuda_peak, rel=0.05), (impl.name, backward)


def test_the_cpu_platform_names_its_vector_width(monkeypatch):
    """CPU golden files are per vector width: numpy and torch sum in another order with wider
    vectors, so one machine's errors are not another's (an AVX2 machine moved 5 of 560 metrics
    of a file measured at an unrecorded width by 11-24 %)."""
    import torch
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert golden.platform_name("cpu") == "cpu-interpreter-avx512"
    assert "AVX512" in golden.environment("cpu")["device"]
