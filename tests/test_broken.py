"""The property suite catches each planted bug class, and passes the correct blockwise twin.

Each broken variant (tests/broken_impls.py) must fail the property written for its bug
class; the time to the (shrunk) failure is printed (run with -s to see it).
"""

import re
import time

import pytest
from hypothesis.errors import FlakyFailure

import broken_impls as bi
from flashverify.plugin import Env, _register_profiles
from flashverify.properties import test_properties as props

_register_profiles()
ENV = Env(device="cpu", profile="hunt", max_seqlen=64, repro_dir=None)
CI_ENV = Env(device="cpu", profile="ci", max_seqlen=64, repro_dir=None)

PLANTED = [
    (bi.DropsPartialBlock, props.test_forward_within_bounds, "a-priori bound"),
    (bi.WrongCausalAlignment, props.test_causal_alignment_with_unequal_lengths, "asked for bottom_right"),
    (bi.NanOnMaskedRows, props.test_fully_masked_rows_give_zero, "NaN"),
    (bi.WrongGqaMapping, props.test_gqa_equals_repeated_kv, ""),
    (bi.AssumesContiguous, props.test_forward_within_bounds, ""),
    (bi.DropoutMaskDiffersInBackward, props.test_dropout_gradient_matches_forward_mask, "directional derivative"),
    # overflow to NaN at large logits, or (hypothesis may meet it first) lost accuracy where the
    # naive reference is exact; the derandomized search order changes with the suite's source
    (bi.NoMaxSubtraction, props.test_forward_within_bounds, "NaN/Inf where the oracle is finite|the naive reference's 0 "),
    (bi.BackwardIgnoresDelta, props.test_backward_within_bounds, ""),
    (bi.DropoutWithoutRescale, props.test_dropout_unbiased, "dropout is biased"),
    (bi.DropoutMaskSharedAcrossHeads, props.test_dropout_masks_differ_across_heads, "got the same dropout mask"),
    (bi.OnlineSoftmaxWithoutRescale, props.test_forward_within_bounds, ""),
    (bi.UsesTf32, props.test_forward_within_bounds, r"dtype='float32'"),
    (bi.NondeterministicDq, props.test_deterministic, "dq differs between two identical calls"),
    (bi.BackwardWrongWhenDense, props.test_backward_within_bounds, r"causal=False"),   # shrunk to a dense case
    (bi.BackwardIgnoresDelta, props.test_agrees_with_mpmath_on_sampled_rows, "against mpmath: d"),
]


def _impl(cls):
    impl = cls()
    impl.spec = f"broken_impls:{cls.__name__}"
    return impl


def _messages(error) -> str:
    """The failure's text with hypothesis's notes (the falsifying case); a nondeterministic bug
    fails as hypothesis's FlakyFailure (a group: the failure did not replay), so its members too."""
    parts = [str(error), *getattr(error, "__notes__", [])]
    for inner in getattr(error, "exceptions", ()):
        parts.append(_messages(inner))
    return "\n".join(parts)


@pytest.mark.parametrize("cls,prop,text", PLANTED, ids=[f"{c.__name__}-{p.__name__.removeprefix('test_')}"
                                                         for c, p, _ in PLANTED])
def test_planted_bug_is_found(cls, prop, text):
    start = time.perf_counter()
    with pytest.raises((AssertionError, FlakyFailure)) as info:
        prop(_impl(cls), ENV)
    elapsed = time.perf_counter() - start
    message = _messages(info.value)
    assert re.search(text, message), message
    print(f"\n{cls.__name__}: {prop.__name__} failed after {elapsed:.1f} s: {message.splitlines()[0][:120]}")
    replayable = not (isinstance(info.value, FlakyFailure) or getattr(cls, "nondeterministic_dq", False))
    if replayable:   # the printed reproducer, pasted and run, fails the same way (a random bug may not)
        with pytest.raises(AssertionError) as again:
            exec(_reproducer(message), {})
        assert str(again.value).splitlines()[0] == str(info.value).splitlines()[0]


def _reproducer(message: str) -> str:
    start = message.index("# flashverify reproducer")
    return message[start:message.index("\n", message.index("print(", start))]


CORRECT_PROPERTIES = [props.test_forward_within_bounds, props.test_backward_within_bounds,
                      props.test_causal_alignment_with_unequal_lengths, props.test_fully_masked_rows_give_zero,
                      props.test_gqa_equals_repeated_kv, props.test_dropout_gradient_matches_forward_mask,
                      props.test_dropout_unbiased, props.test_dropout_masks_differ_across_heads,
                      props.test_deterministic,
                      props.test_agrees_with_mpmath_on_sampled_rows]


@pytest.mark.parametrize("prop", CORRECT_PROPERTIES, ids=[p.__name__ for p in CORRECT_PROPERTIES])
def test_correct_twin_passes(prop):
    prop(_impl(bi.TorchFlash), CI_ENV)


def test_an_error_in_the_harness_is_named_as_such(monkeypatch):
    """An exception from flashverify's own code (here, the oracle comparison) is reported as a
    harness bug, not as the implementation failing."""
    def broken_evaluate(*args, **kwargs):
        raise ValueError("cannot convert inf or nan to int")
    monkeypatch.setattr(props, "evaluate", broken_evaluate)
    with pytest.raises(props.HarnessError, match="flashverify itself raised ValueError.*not a verdict on"):
        props.test_forward_within_bounds(_impl(bi.TorchFlash), CI_ENV)
