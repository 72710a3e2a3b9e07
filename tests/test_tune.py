"""benchmarks/tune.py's choice of tiles from measured timings (pure Python: the timing needs a GPU)."""

import importlib.util
import pathlib

import pytest

_spec = importlib.util.spec_from_file_location("tune", pathlib.Path(__file__).parents[1] / "benchmarks" / "tune.py")
tune = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tune)

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
