"""Metrics on hand-made cases with known answers."""

import math

import torch

from flashverify.metrics import tensor_error, unwritten


def test_known_errors():
    ref = torch.tensor([1.0, 2.0, -4.0, 0.5], dtype=torch.float64)
    x = torch.tensor([1.0, 2.5, -4.0, 0.5], dtype=torch.float32)
    e = tensor_error(x, ref)
    assert e.max_abs == 0.5
    assert math.isclose(e.rel_fro, 0.5 / math.sqrt(1 + 4 + 16 + 0.25))
    assert math.isclose(e.rmse, 0.5 / 2)
    # 0.5 at |ref| = 2 is 0.5 / (2 * 2**-23) = 2**21 ulps of float32
    assert e.max_ulp == 2.0**21
    assert e.finite_mismatch == 0


def test_ulps_of_the_output_dtype():
    ref = torch.tensor([1.0], dtype=torch.float64)
    one_ulp_fp16 = torch.tensor([1.0 + 2.0**-10], dtype=torch.float16)
    assert tensor_error(one_ulp_fp16, ref).max_ulp == 1.0
    assert tensor_error(one_ulp_fp16.float(), ref, dtype=torch.float16).max_ulp == 1.0


def test_nonfinite_both_directions():
    ref = torch.tensor([1.0, float("nan"), float("-inf"), float("-inf"), 3.0], dtype=torch.float64)
    x = torch.tensor([float("nan"), 2.0, float("-inf"), float("inf"), float("inf")])
    e = tensor_error(x, ref)
    assert e.kernel_nonfinite == 2      # NaN and +inf where the oracle is finite
    assert e.oracle_nonfinite == 1      # finite 2.0 where the oracle is NaN
    assert e.mismatched_inf == 1        # +inf vs -inf
    assert e.max_abs == 0.0             # the matching -inf pair contributes no error


def test_matching_infinities_are_exact():
    ref = torch.tensor([float("-inf"), 1.0], dtype=torch.float64)
    e = tensor_error(torch.tensor([float("-inf"), 1.0]), ref)
    assert e.finite_mismatch == 0 and e.max_abs == 0.0 and e.rel_fro == 0.0


def test_zero_reference():
    zero = torch.zeros(3, dtype=torch.float64)
    assert tensor_error(torch.zeros(3), zero).rel_fro == 0.0
    assert tensor_error(torch.tensor([0.0, 1e-8, 0.0]), zero).rel_fro == math.inf


def test_unwritten():
    out = torch.full((4,), float("nan"))
    out[:3] = 1.0
    assert unwritten(out) == 1
    assert unwritten(torch.tensor([7.0, 1.0]), poison=7.0) == 1
