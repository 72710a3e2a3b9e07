"""The pure-Python parts of the GPU tools in benchmarks/: tune.py's choice of tiles, summarize.py's
tables, timing.py's timers (the measurements themselves need a GPU)."""

import importlib.util
import json
import pathlib
import time

import pytest


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tune, summarize, timing = _tool("tune"), _tool("summarize"), _tool("timing")


# --- tune.choose --------------------------------------------------------------------------------

NS = (1024, 4096, 16384)


def _timings(**ms_by_name):
    """{name: {"tile": ..., "N<n>": ms}} from name=(ms at each of NS)."""
    return {name: {"tile": [i, i, 4, 3], **{f"N{n}": t for n, t in zip(NS, ms)}}
            for i, (name, ms) in enumerate(ms_by_name.items())}


def test_the_overall_winner_serves_every_n_it_is_within_noise_of():
    got = tune.choose(_timings(a=(1.00, 4.00, 16.0), b=(1.01, 4.20, 16.5)), NS)
    assert got == {n: "a" for n in NS}


def test_a_candidate_more_than_noise_faster_at_one_n_takes_that_n():
    faster = 1.0 / (1 + tune.NOISE) - 0.01   # beyond the noise at N=1K only
    got = tune.choose(_timings(a=(1.00, 4.00, 16.0), b=(faster, 4.40, 17.6)), NS)
    assert got == {1024: "b", 4096: "a", 16384: "a"}


def test_scores_are_the_geometric_mean_over_n_of_time_over_the_fastest():
    timings = _timings(a=(1.0, 4.0, 16.0), b=(2.0, 4.0, 16.0))
    tune.choose(timings, NS)
    assert timings["a"]["score"] == pytest.approx(1.0)
    assert timings["b"]["score"] == pytest.approx(2 ** (1 / 3))


def test_a_held_tile_within_noise_of_the_choice_stays():
    got = tune.choose(_timings(a=(1.00, 4.00, 16.0), b=(1.02, 4.08, 16.3)), NS, held={n: "b" for n in NS})
    assert got == {n: "b" for n in NS}


def test_a_held_tile_is_replaced_where_the_choice_beats_it_beyond_noise():
    slower = 1.0 * (1 + tune.NOISE) + 0.01
    got = tune.choose(_timings(a=(1.00, 4.00, 16.0), b=(slower, 4.05, 16.1)), NS, held={n: "b" for n in NS})
    assert got == {1024: "a", 4096: "b", 16384: "b"}


def test_a_held_tile_that_was_not_measured_at_every_n_is_not_kept():
    timings = _timings(a=(1.00, 4.00, 16.0))
    timings["gone"] = {"tile": [9, 9, 4, 3], "N1024": 1.0}   # failed to run at 4K and 16K
    assert tune.choose(timings, NS, held={n: "gone" for n in NS}) == {n: "a" for n in NS}


def test_the_load_pass_times_the_chosen_tile_through_tma_and_through_pointers(monkeypatch, device):
    """tune._faster_loads runs the kernel with each load path, the tile otherwise unchanged
    (on the interpreter or the GPU, with a stand-in for do_bench that reports which path the
    dK/dV kernel's tile took: TMA "faster" when it was TMA)."""
    import importlib
    import torch
    a = importlib.import_module("flashverify.kernels.attention")
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 40, 32, generator=g).half().to(device) for _ in range(4))
    config = a.default_config(32, torch.float16)
    o, _, stats = a._forward(q, k, v, tune._problem(q, k, v, False, config))
    tma_pair, tiles = a._tma_pair, []
    monkeypatch.setattr(a, "_tma_pair", lambda *args: tiles.append(args[-1]) or tma_pair(*args))

    def do_bench(fn, warmup, rep):
        tiles.clear()
        fn()
        dkdv = tiles[0]   # _backward launches dK/dV first
        assert (dkdv.block_m, dkdv.block_n, dkdv.num_warps, dkdv.num_stages) == (16, 16, 4, 2)
        return 1.0 if dkdv.tma else 2.0

    got = tune._faster_loads((q, k, v, do, (o, stats)), False, "dkdv", config, [16, 16, 4, 2], do_bench)
    assert got == {"tma": 1.0, "pointers": 2.0}


def test_paired_timings_alternate_their_order_and_take_each_configs_median(monkeypatch):
    import importlib
    a = importlib.import_module("flashverify.kernels.attention")
    A, B, other = a.Tile(16, 16), a.Tile(32, 16), a.Tile(64, 64)
    runs = []
    monkeypatch.setattr(tune, "_run", lambda q, k, v, do, causal, kernel, config, fwd_out: runs.append(config.fwd))
    times = {A: iter([1.0, 9.0, 1.2, 1.1, 1.3]), B: iter([2.0, 2.2, 0.1, 2.1, 2.3])}

    def do_bench(fn, warmup, rep):
        fn()
        return next(times[runs[-1]])

    got = tune._paired((None,) * 5, False, "fwd", a.LaunchConfig(other, other, other), {"a": A, "b": B}, do_bench)
    assert runs == [A, B, B, A] * (tune.ROUNDS // 2) + [A, B] * (tune.ROUNDS % 2)
    assert got == {"a": 1.2, "b": 2.1}   # the medians: one outlier each left out


def test_a_new_tile_takes_the_faster_loads_and_a_committed_tile_keeps_its_own_within_noise():
    within = {"tma": 1.0, "pointers": 1.0 + tune.NOISE / 2}
    beyond = {"tma": 1.0, "pointers": 1.0 + 2 * tune.NOISE}
    assert tune.takes_tma(within) and not tune.takes_tma({"tma": within["pointers"], "pointers": 1.0})
    assert not tune.takes_tma(within, held=False)     # the committed pointers stay
    assert tune.takes_tma(beyond, held=False)         # unless TMA is more than NOISE faster
    assert tune.takes_tma({"tma": within["pointers"], "pointers": 1.0}, held=True)
    assert not tune.takes_tma({"tma": beyond["pointers"], "pointers": 1.0}, held=True)


class _InProcessPool:
    """multiprocessing's spawn context, in this process (tune.main's compile step)."""
    def Pool(self, n):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    imap_unordered = staticmethod(map)


def _tune(monkeypatch, tmp_path, device, committed, clock, argv=()):
    """The table tune.main writes for head dim 32 at N = 32 and 64, two tiles per kernel, with a
    stand-in clock: clock(kernel, tile, n, reading) gives the ms of the reading-th timing (from 0)
    of that tile. The kernel under test is left out (tune._run returns its inputs); the forward
    whose output the backward's timings read runs, on the interpreter or the GPU (device)."""
    import importlib
    import torch
    import triton.testing
    a = importlib.import_module("flashverify.kernels.attention")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Test GPU")
    monkeypatch.setattr(a, "device_slug", lambda device: "test-gpu")
    monkeypatch.setattr(a, "tuned_tiles", lambda slug: committed)
    monkeypatch.setattr(tune, "mp", type("mp", (), {"get_context": staticmethod(lambda how: _InProcessPool())}))
    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(tune, "_inputs", lambda b, n, d, seed=0: [   # the compile step's N=256 too
        torch.randn(b, 2, min(n, 64), d, generator=g).half().to(device) for _ in range(4)])
    ran, readings = [], {}

    def run(q, k, v, do, causal, kernel, config, fwd_out=None):
        ran.append((kernel, getattr(config, kernel), q.shape[2]))
        return (q,) if kernel == "fwd" else (q, k, v)

    def do_bench(fn, warmup, rep):
        fn()
        reading = readings[ran[-1]] = readings.get(ran[-1], -1) + 1
        return clock(*ran[-1], reading)

    monkeypatch.setattr(tune, "_run", run)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    monkeypatch.setattr(tune, "TOKENS", 64)
    monkeypatch.setattr(tune, "NS", (32, 64))
    monkeypatch.setattr(tune, "HEAD_DIMS", (32,))
    monkeypatch.setattr(tune, "CANDIDATES", {"fwd": [(16, 16, 4, 2), (32, 16, 4, 2)],
                                             "dkdv": [(16, 16, 4, 2), (16, 32, 4, 2)],
                                             "dq": [(16, 16, 4, 2), (32, 16, 4, 2)]})
    out = tmp_path / "table.json"
    tune.main(["--out", str(out), *argv])
    return json.loads(out.read_text())


def _committed():
    """A committed table for _tune: the second candidate of each kernel, fwd and dq on pointers."""
    import importlib
    a = importlib.import_module("flashverify.kernels.attention")
    config = a.LaunchConfig(a.Tile(32, 16, 4, 2, tma=False), a.Tile(16, 32, 4, 2, tma=True), a.Tile(32, 16, 4, 2, tma=False))
    return {key: {n: config for n in (32, 64)} for key in ("D32-dense", "D32-masked")}


COMMITTED = {"fwd": [32, 16, 4, 2, False], "dkdv": [16, 32, 4, 2, True], "dq": [32, 16, 4, 2, False]}


def _everywhere(entry):
    return {key: {f"N{n}": entry for n in (32, 64)} for key in ("D32-dense", "D32-masked")}


def test_a_retune_that_measures_no_difference_changes_no_tile_and_no_load_path(monkeypatch, tmp_path, device):
    """Every timing equal: each committed tile and its loads stay (the holds of choose and of
    takes_tma). Fresh, each entry is the first candidate, on TMA."""
    table = _tune(monkeypatch, tmp_path, device, _committed(), lambda kernel, tile, n, reading: 1.0)
    assert table["tiles"] == _everywhere(COMMITTED)
    fresh = _tune(monkeypatch, tmp_path, device, _committed(), lambda kernel, tile, n, reading: 1.0, ["--fresh"])
    assert fresh["tiles"] == _everywhere({kernel: [16, 16, 4, 2, True] for kernel in COMMITTED})


def test_a_committed_tile_slow_in_one_timing_only_stays_through_the_interleaved_timings(monkeypatch, tmp_path, device):
    """The committed tile's first timing reads 20 % slow, so choose picks the other; the
    interleaved timings of the two read them equal, and the committed tile stays."""
    def clock(kernel, tile, n, reading):
        return 1.2 if tile.block_m * tile.block_n == 512 and reading == 0 else 1.0
    table = _tune(monkeypatch, tmp_path, device, _committed(), clock)
    assert table["tiles"] == _everywhere(COMMITTED)
    confirmations = table["timings_ms"]["D32-dense"]["dkdv"]["16x16w4s2"]["against_committed_ms"]
    assert confirmations == {"N32": {"new": 1.0, "committed": 1.0}, "N64": {"new": 1.0, "committed": 1.0}}


def test_a_tile_faster_beyond_noise_replaces_the_committed_one_and_takes_its_faster_loads(monkeypatch, tmp_path, device):
    """dK/dV's first candidate is 10 % faster in every timing: it replaces the committed tile, on
    TMA where the two ways tie. The committed forward tile stays, but TMA loads read 10 % faster
    for it: beyond NOISE, so it leaves its committed pointer loads."""
    def clock(kernel, tile, n, reading):
        if kernel == "dkdv" and tile.block_n == 16:
            return 0.9
        return 0.9 if kernel == "fwd" and tile.block_m == 32 and tile.tma else 1.0
    table = _tune(monkeypatch, tmp_path, device, _committed(), clock)
    assert table["tiles"] == _everywhere(dict(COMMITTED, fwd=[32, 16, 4, 2, True], dkdv=[16, 16, 4, 2, True]))

# --- summarize ------------------------------------------------------------------------------------

def _grid_file(path, tflops_by_impl, back_to_back=True):
    """A pytest-benchmark JSON of one config (fwd fp16 D=128 dense N=1K) with the given TFLOP/s
    (call + synchronize; back to back: twice that; background CPU seconds: a thousandth)."""
    info = dict(direction="fwd", dtype="torch.float16", d=128, causal=False, N=1024, B=32, H=16, flops=2.75e11)
    benchmarks = []
    for impl, t in tflops_by_impl.items():
        rates = {"tflops": t, "background_cpu_s": t / 1000, **({"tflops_back_to_back": 2 * t} if back_to_back else {})}
        benchmarks.append({"extra_info": dict(info, impl=impl, **rates)})
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


def test_back_to_back_reads_the_back_to_back_rates(tmp_path, capsys):
    summarize.main([_grid_file(tmp_path / "a.json", {"flashverify": 300.0, "flex": 400.0}), "--back-to-back"])
    out = capsys.readouterr().out
    assert "calls back to back" in out
    assert _row(out).split()[5:8] == ["600.0", "800.0", "0.75"]


def test_background_lists_the_cpu_seconds_of_each_test_and_no_ratios(tmp_path, capsys):
    summarize.main([_grid_file(tmp_path / "a.json", {"flashverify": 300.0, "flex": 400.0}), "--background"])
    out = capsys.readouterr().out
    assert "CPU s of descendant processes" in out and "ours/" not in out
    assert _row(out).split()[5:] == ["0.30", "0.40"]
    with pytest.raises(SystemExit):
        summarize.main([str(tmp_path / "a.json"), "--background", "--back-to-back"])


def test_back_to_back_of_a_grid_without_it_is_an_error_naming_the_file(tmp_path):
    path = _grid_file(tmp_path / "old.json", {"flashverify": 300.0}, back_to_back=False)
    with pytest.raises(SystemExit, match="old.json: no 'tflops_back_to_back'"):
        summarize.main([path, "--back-to-back"])


def test_a_missing_or_broken_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    for name in ("absent.json", "broken.json"):
        with pytest.raises(SystemExit, match=f"bench '.*{name}': not a readable pytest-benchmark JSON file"):
            summarize.main([str(tmp_path / name)])


# --- timing ---------------------------------------------------------------------------------------

class _Clock:
    """A call that takes `seconds` of host time, and a synchronize that takes `sync_s` more."""

    def __init__(self, seconds, sync_s=0.0):
        self.seconds, self.sync_s, self.calls, self.syncs = seconds, sync_s, 0, 0

    def call(self):
        self.calls += 1
        time.sleep(self.seconds)

    def synchronize(self):
        self.syncs += 1
        time.sleep(self.sync_s)


def test_call_sync_ms_times_the_call_and_its_synchronize():
    clock = _Clock(0.002, sync_s=0.001)
    ms = timing.call_sync_ms(clock.call, warmup_s=0.0, timed_s=0.03, min_calls=5, synchronize=clock.synchronize)
    assert 3.0 <= ms < 20.0                 # 2 ms call + 1 ms synchronize (a sleep overshoots, never undershoots)
    assert clock.syncs == clock.calls       # every call synchronized


def test_call_sync_ms_leaves_the_warm_up_calls_out():
    start = time.perf_counter()

    def call():   # 10 ms a call during the first 50 ms, then 1 ms
        time.sleep(0.010 if time.perf_counter() - start < 0.05 else 0.001)
    ms = timing.call_sync_ms(call, warmup_s=0.05, timed_s=0.0, min_calls=3, synchronize=lambda: None)
    assert ms < 5.0                          # counted, the five slow warm-up calls would be the median


def test_call_sync_ms_takes_at_least_min_calls():
    clock = _Clock(0.0)
    timing.call_sync_ms(clock.call, warmup_s=0.0, timed_s=0.0, min_calls=25, synchronize=clock.synchronize)
    assert clock.calls == 25


def test_call_sync_rounds_split_each_round_into_the_host_share_and_the_whole():
    clock = _Clock(0.002, sync_s=0.003)
    rounds = timing.call_sync_rounds(clock.call, warmup_s=0.0, timed_s=0.0, min_calls=6, synchronize=clock.synchronize)
    assert len(rounds) == 6
    for host_us, round_ms in rounds:
        assert 2000 <= host_us < 2000 + 10000 and 5.0 <= round_ms < 20.0 and round_ms * 1e3 > host_us


def test_call_sync_percentiles_are_those_of_the_rounds():
    clock = _Clock(0.002, sync_s=0.003)
    host, total = timing.call_sync_percentiles(clock.call, warmup_s=0.0, timed_s=0.0, min_calls=6,
                                               synchronize=clock.synchronize)
    assert len(host) == len(total) == 3 and host == sorted(host) and total == sorted(total)
    assert 2000 <= host[0] and 5.0 <= total[0] and total[-1] * 1e3 > host[-1]


def test_percentiles_are_nearest_rank():
    assert timing.percentiles(range(1, 101)) == [10, 50, 90]
    assert timing.percentiles([3.0]) == [3.0, 3.0, 3.0]
    assert timing.percentiles([5, 1, 4, 2, 3], ps=(0, 100)) == [1, 5]


def test_host_us_counts_host_time_per_call_and_synchronizes_only_between_batches():
    clock = _Clock(0.001, sync_s=0.2)
    us = timing.host_us(clock.call, calls=20, batches=3, synchronize=clock.synchronize)
    assert 1000 <= us < 5000                # 1 ms a call; counted, the 200 ms synchronizes would add 10 ms
    assert clock.calls == 1 + 20 * 3 and clock.syncs == 1 + 3


def test_back_to_back_ms_pays_one_synchronize_per_batch_not_per_call():
    clock = _Clock(0.002, sync_s=0.005)
    ms = timing.back_to_back_ms(clock.call, timed_s=0.3, batches=3, synchronize=clock.synchronize)
    assert 2.0 <= ms < 4.0                  # 2 ms a call + 5 ms over a batch of ~15; synchronized each, 7 ms
    assert clock.syncs == 2 + 3             # before and after the sizing call, then one per batch


# --- test_speed.py's order ------------------------------------------------------------------------

def test_the_speed_grid_runs_light_configs_first_and_a_configs_implementations_together(pytester):
    """No N=1K config may follow an N=16K one (the first implementation timed after the heavy
    tests ran slow: docs/performance.md, session 13), and a config's five implementations run
    one after another (not minutes apart: session 10)."""
    bench = pathlib.Path(__file__).parents[1] / "benchmarks"
    result = pytester.runpytest_subprocess("--collect-only", "-q", "-p", "no:cacheprovider", str(bench / "test_speed.py"))
    ids = [line.split("[", 1)[1].rstrip("]") for line in result.outlines if "test_speed[" in line]
    assert len(ids) == 2 * 2 * 2 * 2 * 3 * 5, result.outlines[-5:]
    ns = [i.split("-")[0] for i in ids]
    assert ns == sorted(ns, key=["N1K", "N4K", "N16K"].index), "a lighter config follows a heavier one"
    configs = ["-".join(i.split("-")[:5]) for i in ids]   # N, direction, dtype, D, mask; then the implementation
    for at in range(0, len(ids), 5):
        assert len(set(configs[at:at + 5])) == 1, f"implementations of {configs[at]} are not together"


def _speed_module(name="test_speed"):
    """benchmarks/test_speed.py (or a tool that imports it) as a module."""
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / "benchmarks"))   # test_speed imports timing
    try:
        return _tool(name)
    finally:
        sys.path.pop(0)


def test_the_speed_grid_times_without_inductors_pool_of_compile_workers(pytester):
    """The pool FlexAttention's first call starts would be starting up while the next tests time
    (test_speed.py says what it cost there): the grid's tests run with compile_threads = 1, and
    only they. Importing test_speed changes nothing: process_context.py imports it and times
    with the pool."""
    import torch._inductor.config as inductor
    with inductor.patch(compile_threads=4):   # a pool, as on a GPU host (monkeypatch's undo deletes
        speed = _speed_module()               # the setting from torch's config: inductor then fails)
        assert inductor.compile_threads == 4
        with pytest.raises(RuntimeError):
            with speed.compiling_in_process():
                assert inductor.compile_threads == 1
                raise RuntimeError
        assert inductor.compile_threads == 4
    pytester.makepyfile(test_grid_like=f"""
        import sys
        sys.path.insert(0, {str(pathlib.Path(__file__).parents[1] / "benchmarks")!r})
        import torch._inductor.config as inductor
        inductor.compile_threads = 4
        from test_speed import _grid_compiles_in_process

        def test_a_timing():
            assert inductor.compile_threads == 1
        """)
    pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_grids_compile_step_takes_the_configs_a_k_expression_names():
    speed = _speed_module()
    assert len(speed.compiled_configs()) == 2 * 2 * 2 * 2 * 3          # ours and FlexAttention, every config
    assert len(speed.compiled_configs("fp16")) == 2 * 2 * 2 * 3
    one = speed.compiled_configs("fp16 and D128 and dense and N1K")
    assert [(impl, d, causal, n) for impl, _, d, causal, n in one] == [("flashverify", 128, False, 1024),
                                                                       ("flex", 128, False, 1024)]
    assert speed.compiled_configs("fp16 and N2K") == []


# --- timing.descendants ---------------------------------------------------------------------------

@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_descendants_counts_live_child_processes_and_their_cpu_time():
    """timing.descendants sees a busy child (and its child) and the CPU time they used: what
    tells whether FlexAttention left compile workers running beside a timing."""
    import subprocess
    import sys
    before = timing.descendants()
    spin = "import subprocess, time\np = subprocess.Popen(['sleep', '3'])\nt = time.time()\nwhile time.time() - t < 0.6: pass\ntime.sleep(3)"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(1.5)
        count, cpu_s = timing.descendants()
    finally:
        child.kill()
        child.wait()
    assert count == before[0] + 2     # the spinning child and its sleeping child
    assert cpu_s - before[1] >= 0.3   # the child's 0.6 s of spinning (clock ticks: 10 ms)


# --- ab_kernel.py --host ----------------------------------------------------------------------------

def test_ab_kernel_host_times_tell_the_slower_version(tmp_path):
    """ab_kernel.py --host on the CPU: a base whose _forward sleeps 0.3 ms comes out slower than
    this kernel in _forward and attention() (and not in _backward), under its own label."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    root = pathlib.Path(__file__).parents[1]
    base = tmp_path / "base"
    shutil.copytree(root / "kernels", base, ignore=shutil.ignore_patterns("__pycache__"))
    source = (base / "attention.py").read_text()
    assert "def _forward(q, k, v, pb: _Problem):\n" in source
    (base / "attention.py").write_text(source.replace("def _forward(q, k, v, pb: _Problem):\n",
                                                      "def _forward(q, k, v, pb: _Problem):\n    time.sleep(3e-4)\n")
                                       .replace("import os\n", "import os\nimport time\n", 1))
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "ab_kernel.py"), str(base), "--host", "--rounds", "1"],
                         cwd=root, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""})   # the CPU, also on a GPU machine
    assert out.returncode == 0, out.stderr[-2000:]
    ratio = {m[0]: float(m[1]) for m in re.findall(r"^(\S+)\s+host time.*\((\d+\.\d+)\)$", out.stdout, re.M)}
    assert set(ratio) == {"attention()", "_forward", "_backward"}, out.stdout
    assert ratio["_forward"] < 0.5 and ratio["attention()"] < 0.5 and ratio["_backward"] > 0.5, out.stdout


# --- set_tile.py ------------------------------------------------------------------------------------

def test_set_tile_changes_the_one_entry_and_prints_its_n(tmp_path, capsys):
    set_tile = _tool("set_tile")
    committed = pathlib.Path(__file__).parents[1] / "kernels" / "tiles" / "nvidia-h200.json"
    path = tmp_path / "table.json"
    path.write_text(committed.read_text())
    set_tile.main(["D128-dense", "N1024", "dq", "128", "64", "8", "3", "true", "--table", str(path)])
    assert capsys.readouterr().out == "1024\n"
    before, after = json.loads(committed.read_text()), json.loads(path.read_text())
    assert after["tiles"]["D128-dense"]["N1024"]["dq"] == [128, 64, 8, 3, True]
    after["tiles"]["D128-dense"]["N1024"]["dq"] = before["tiles"]["D128-dense"]["N1024"]["dq"]
    assert after == before   # nothing else moved


@pytest.mark.parametrize("args, named", [
    (["D96-dense", "N1024", "dq", "128", "64", "8", "3"], "KEY must be one of"),
    (["D128-dense", "N2048", "dq", "128", "64", "8", "3"], "N must be one of"),
    (["D128-dense", "N1024", "dq", "128", "48", "8", "3"], "BLOCK_M and BLOCK_N must be powers of two >= 16"),
    (["D128-dense", "N1024", "dq", "8", "64", "8", "3"], "BLOCK_M and BLOCK_N must be powers of two >= 16"),
    (["D128-dense", "N1024", "dq", "128", "64", "6", "3"], "WARPS must be a power of two and STAGES at least 1"),
    (["D128-dense", "N1024", "dq", "128", "64", "8", "0"], "WARPS must be a power of two and STAGES at least 1"),
])
def test_set_tile_names_what_the_table_does_not_have_or_a_tile_the_kernels_cannot_take(tmp_path, args, named):
    set_tile = _tool("set_tile")
    path = tmp_path / "table.json"
    text = (pathlib.Path(__file__).parents[1] / "kernels" / "tiles" / "nvidia-h200.json").read_text()
    path.write_text(text)
    with pytest.raises(SystemExit, match=named):
        set_tile.main([*args, "true", "--table", str(path)])
    assert path.read_text() == text   # nothing written


# --- back_to_back_window.py ----------------------------------------------------------------------

def test_the_window_summary_gives_medians_and_ours_against_flexattention_round_by_round():
    """From session 21's fp16 D=128 dense rounds (benchmarks/results/2026-12-02-h200-s21/b2b-window.log):
    ours faster back to back in all six rounds, by call + synchronize in five."""
    window = _speed_module("back_to_back_window")
    ours_sync, ours_b2b = (2.148, 2.213, 2.194, 2.182, 2.186, 2.148), (2.043, 2.078, 2.079, 2.057, 2.048, 2.055)
    flex_sync, flex_b2b = (2.191, 2.195, 2.243, 2.219, 2.230, 2.254), (2.047, 2.088, 2.085, 2.070, 2.070, 2.070)
    rounds = {"flashverify": list(zip(ours_sync, ours_b2b)), "flex": list(zip(flex_sync, flex_b2b))}
    lines = window.round_summary("fp16 D128 N1024 dense", rounds)
    assert lines[0] == "fp16 D128 N1024 dense flashverify  over 6 rounds: call+sync 2.184 ms, back to back 2.056 ms"
    assert lines[1] == "fp16 D128 N1024 dense flex         over 6 rounds: call+sync 2.224 ms, back to back 2.070 ms"
    assert lines[2] == ("fp16 D128 N1024 dense ours/flex speed: call+sync 1.019 (ours faster in 5 of 6 rounds); "
                        "back to back 1.007 (ours faster in 6 of 6 rounds)")
    slower = {"flashverify": rounds["flex"], "flex": rounds["flashverify"]}   # the two swapped
    assert "call+sync 0.982 (ours faster in 1 of 6 rounds)" in window.round_summary("c", slower)[2]


def test_the_window_tool_takes_a_dtype_and_a_direction_and_names_the_values_it_accepts():
    import torch
    window = _speed_module("back_to_back_window")
    defaults = {"--dtype": torch.float16, "--direction": "bwd"}
    assert window.options_and_rest(["128", "1024", "0"]) == (defaults, ["128", "1024", "0"])
    assert window.options_and_rest(["--dtype", "bf16", "64", "1024", "1"]) == (
        {"--dtype": torch.bfloat16, "--direction": "bwd"}, ["64", "1024", "1"])
    assert window.options_and_rest(["--direction", "fwd", "--dtype", "bf16", "128", "1024", "1"]) == (
        {"--dtype": torch.bfloat16, "--direction": "fwd"}, ["128", "1024", "1"])
    for bad, message in ((["--dtype", "fp8"], "--dtype: one of fp16, bf16, got fp8"),
                         (["--dtype"], "--dtype: one of fp16, bf16, got nothing"),
                         (["--direction", "both"], "--direction: one of bwd, fwd, got both")):
        with pytest.raises(SystemExit, match=message):
            window.options_and_rest(bad)
