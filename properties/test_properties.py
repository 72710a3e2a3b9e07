"""Properties every attention implementation must have, each shrunk by hypothesis to a minimal case.

Run against any kernel: ``pytest --pyargs flashverify.properties --attn-impl=module:callable``.
Each property is one test function parametrized by the implementation (``attn_impl``);
a property needing a feature the implementation does not declare is skipped with the reason.
Failures print a paste-and-run reproducer (and save it with ``--attn-repro-dir``).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import currently_in_test_context, given, note, reject, target
from hypothesis.errors import FailedHealthCheck, HypothesisException, Unsatisfiable
from hypothesis import strategies as st

from flashverify.case import Inputs
from flashverify.evaluate import Outputs, evaluate, evaluate_against_mpmath, output_bound
from flashverify.impls import ImplementationError, Unsupported
from flashverify.plugin import record_declined, record_worst
from flashverify.properties import strategies as fst
from flashverify.repro import property_reproducer, save

GRADS = ("dq", "dk", "dv")


class HarnessError(Exception):
    """flashverify's own code (oracles, bounds, a property) failed on an example: not a verdict on
    the implementation. The release profile met one (the mpmath oracle on an all -inf row)."""


# --- helpers ---------------------------------------------------------------------------------

def require(impl, *features):
    """Skip (visibly) unless the implementation declares every feature."""
    caps = impl.capabilities
    have = {"backward": caps.backward, "dropout": caps.dropout, "keep_mask": caps.keep_mask and caps.dropout,
            "lse": caps.lse, "gqa": caps.gqa, "causal": bool(caps.causal_alignments),
            "key_lengths": caps.key_lengths or "bool" in caps.masks, "float32": "float32" in caps.dtypes,
            "deterministic_dropout": caps.dropout and caps.deterministic_dropout}
    missing = [f for f in features if not have[f]]
    if missing:
        why = "; ".join(caps.notes.get(f, "") for f in missing if caps.notes.get(f))
        pytest.skip(f"{impl.name} does not declare {', '.join(missing)}" + (f" ({why})" if why else ""))


def for_all(impl, env, strategy, name):
    """Run `check(example)` on examples of `strategy` under the run's hypothesis profile (or on
    env.replay alone: what a failure's reproducer runs, see flashverify.properties.replay).

    A case the implementation declines (impls.Unsupported) is rejected and counted for the
    summary; if it declines so many that hypothesis gives up, the property is skipped with the
    reason and the counts."""
    declined, accepted = {}, 0

    def decorate(check):
        if env.replay is not None:
            check(env.replay)
            return

        @env.settings
        @given(case=strategy)
        def inner(case):
            nonlocal accepted
            text = property_reproducer(impl.spec, case, env.device, name)
            note(text)
            try:
                check(case)
                accepted += 1
            except Unsupported as e:
                reason = str(e).splitlines()[0]
                declined[reason] = declined.get(reason, 0) + 1
                record_declined(impl.spec, name, reason)
                reject()
            except AssertionError:
                if env.repro_dir:
                    note(f"reproducer saved to {save(env.repro_dir, impl.spec, name, text)}")
                raise
            except (ImplementationError, HypothesisException):
                raise
            except Exception as e:  # impl.run wraps what the implementation raises: this is ours
                raise HarnessError(f"flashverify itself raised {type(e).__name__}: {e} - a harness bug, not a "
                                   f"verdict on {impl.name}; please report it with the reproducer") from e
        try:
            inner()
        except (Unsatisfiable, FailedHealthCheck):
            if not declined:
                raise
            top = max(declined, key=declined.get)
            pytest.skip(f"{impl.name} declined {sum(declined.values())} of the cases drawn, accepted {accepted}: "
                        f"too few to run the property (most often: {top[:300]})")
    return decorate


def cases_for(impl, env, **kw):
    if not impl.capabilities.dtypes:  # e.g. an SDPA backend this machine does not have
        why = "; ".join(f"{d}: {impl.capabilities.notes[d]}" for d in fst.ALL_DTYPES if d in impl.capabilities.notes)
        pytest.skip(f"{impl.name} runs on no dtype here" + (f" ({why})" if why else ""))
    kw.setdefault("max_seqlen", env.max_seqlen)
    return fst.cases(impl.capabilities, **kw)


def judge(impl, env, case, x, out, tensors, name):
    """Hold `tensors` of `out` to the oracle and bounds; steer the search to the worst ratio."""
    keep = impl.keep_mask(case, env.device) if case.dropout_p else None
    checks = [c for c in evaluate(case, x, out, keep=keep) if c.tensor in tensors]
    hold(impl, case, checks, name)
    return checks


def hold(impl, case, checks, name, prefix=""):
    """Steer the search toward the worst ratios, record the worst, and fail on any check's failure."""
    for c in checks:
        if currently_in_test_context():   # not when a reproducer replays one example
            target(min(c.bound_ratio, 1e6), label=f"{c.tensor} error / bound")
            if c.reference_ratio is not None:
                target(min(c.reference_ratio, 1e6), label=f"{c.tensor} error / naive error")
        record_worst(impl.spec, name, c, case)
    failures = [r for c in checks for r in c.failures]
    assert not failures, prefix + "\n".join(failures)


def _zero_rows(o, rows):
    return bool((o[rows] == 0).all())


# --- accuracy --------------------------------------------------------------------------------

def test_forward_within_bounds(attn_impl, attn_env):
    """O (and LSE where exposed) within the a-priori bound and 2x the naive error, no stray NaN/Inf."""
    impl, env = attn_impl, attn_env

    @for_all(impl, env, cases_for(impl, env), "forward_within_bounds")
    def check(case):
        x = case.inputs(env.device)
        judge(impl, env, case, x, impl.run(case, x, backward=False), ("o", "lse"), "forward_within_bounds")


def test_backward_within_bounds(attn_impl, attn_env):
    """dQ, dK, dV within the a-priori bound and 3x the naive error (dropout through the seen mask)."""
    impl, env = attn_impl, attn_env
    require(impl, "backward")

    @for_all(impl, env, cases_for(impl, env), "backward_within_bounds")
    def check(case):
        x = case.inputs(env.device)
        judge(impl, env, case, x, impl.run(case, x, backward=True), GRADS, "backward_within_bounds")


def test_agrees_with_mpmath_on_sampled_rows(attn_impl, attn_env):
    """At sampled query rows (O, LSE, dQ) and key columns (dK, dV): within the a-priori bound of
    the arbitrary-precision (mpmath) oracle. The float64 oracle, which every other property
    trusts, is held to the same exact values within its own float64 bound: a disagreement there
    is a harness bug, reported as such. Small problems (mpmath is slow)."""
    impl, env = attn_impl, attn_env
    backward = impl.capabilities.backward

    @for_all(impl, env, cases_for(impl, env, max_seqlen=min(env.max_seqlen, 48), max_head_dim=64),
             "agrees_with_mpmath_on_sampled_rows")
    def check(case):
        x = case.inputs(env.device)
        out = impl.run(case, x, backward=backward)
        keep = impl.keep_mask(case, env.device) if case.dropout_p else None
        checks, oracle_checks = evaluate_against_mpmath(case, x, out, keep=keep)
        oracle_failures = [r for c in oracle_checks for r in c.failures]
        assert not oracle_failures, "harness bug: the float64 oracle disagrees with mpmath: " + "; ".join(
            oracle_failures)
        hold(impl, case, checks, "agrees_with_mpmath_on_sampled_rows", prefix="against mpmath: ")


def test_causal_alignment_with_unequal_lengths(attn_impl, attn_env):
    """With Nq != Nk, causal masking follows the declared alignment (top-left vs bottom-right)."""
    impl, env = attn_impl, attn_env
    require(impl, "causal")
    strategy = st.tuples(cases_for(impl, env, dropout=False).filter(lambda c: c.seqlen_q != c.seqlen_k),
                         st.sampled_from(impl.capabilities.causal_alignments)).map(
        lambda t: t[0].replace(causal=True, causal_alignment=t[1], window=None))

    @for_all(impl, env, strategy, "causal_alignment_with_unequal_lengths")
    def check(case):
        x = case.inputs(env.device)
        out = impl.run(case, x, backward=False)
        try:
            judge(impl, env, case, x, out, ("o",), "causal_alignment_with_unequal_lengths")
        except AssertionError:
            other = "bottom_right" if case.causal_alignment == "top_left" else "top_left"
            flipped = [c for c in evaluate(case.replace(causal_alignment=other), x, out) if c.tensor == "o"]
            if flipped[0].passed:
                raise AssertionError(f"asked for {case.causal_alignment} causal masking, got {other}") from None
            raise


def test_fully_masked_rows_give_zero(attn_impl, attn_env):
    """Rows with no allowed key: O = 0 (not NaN), LSE = -inf where exposed, zero gradients."""
    impl, env = attn_impl, attn_env
    require(impl, "key_lengths")
    strategy = cases_for(impl, env, dropout=False, max_batch=2).filter(lambda c: c.batch == 2).map(
        lambda c: c.replace(key_lengths=(0, c.seqlen_k), causal=False, window=None, mask=None))

    @for_all(impl, env, strategy, "fully_masked_rows_give_zero")
    def check(case):
        x = case.inputs(env.device)
        out = impl.run(case, x, backward=impl.capabilities.backward)
        assert not torch.isnan(out.o).any(), "NaN in the output of a fully masked row"
        assert _zero_rows(out.o, 0), "fully masked rows (key_lengths[0] = 0) are not 0"
        if out.lse is not None:
            assert torch.isneginf(out.lse[0]).all(), "LSE of a fully masked row is not -inf"
        if out.dq is not None:
            for name in GRADS:
                g = getattr(out, name)
                assert not torch.isnan(g).any(), f"NaN in {name}"
            assert (out.dq[0] == 0).all() and (out.dk[0] == 0).all() and (out.dv[0] == 0).all(), \
                "gradients of a fully masked batch entry are not 0"


# --- structure -------------------------------------------------------------------------------

def test_gqa_equals_repeated_kv(attn_impl, attn_env):
    """GQA/MQA gives what repeating each K/V head over its query-head group gives: the two outputs
    differ by at most the sum of their a-priori bounds, and a failure names the head mapping."""
    impl, env = attn_impl, attn_env
    require(impl, "gqa")
    strategy = cases_for(impl, env, dropout=False).filter(lambda c: c.heads_q != c.heads_kv)

    @for_all(impl, env, strategy, "gqa_equals_repeated_kv")
    def check(case):
        x = case.inputs(env.device)
        group = case.heads_q // case.heads_kv
        rep = Inputs(**{**x.__dict__, "k": x.k.repeat_interleave(group, 1), "v": x.v.repeat_interleave(group, 1)})
        mha = case.replace(heads_kv=case.heads_q)
        o_mha = impl.run(mha, rep, backward=False).o
        judge(impl, env, mha, rep, Outputs(o=o_mha), ("o",), "gqa_equals_repeated_kv")
        o_gqa = impl.run(case, x, backward=False).o
        diff = (o_gqa.double() - o_mha.double()).abs().nan_to_num(math.inf)
        assert (diff <= 2 * output_bound(case, x)).all(), (
            f"GQA output differs from the repeated-K/V output by up to {diff.max():.3g} (beyond both bounds) "
            f"while the repeated-K/V output is right: query head h must read K/V head h // {group}")


def test_key_permutation_equivariance(attn_impl, attn_env):
    """Permuting keys and values (and mask columns alike) leaves O unchanged: the two outputs differ
    by at most the sum of their a-priori bounds (a metamorphic check, no oracle output involved)."""
    impl, env = attn_impl, attn_env
    strategy = st.tuples(cases_for(impl, env, dropout=False).map(
        lambda c: c.replace(causal=False, window=None, key_lengths=None)), st.integers(0, 2**31 - 1))

    @for_all(impl, env, strategy, "key_permutation_equivariance")
    def check(args):
        case, perm_seed = args
        x = case.inputs(env.device)
        perm = torch.randperm(case.seqlen_k, generator=torch.Generator().manual_seed(perm_seed)).to(x.q.device)
        mask = x.attn_mask
        if mask is not None:
            mask = mask.index_select(-1, perm)
        px = Inputs(**{**x.__dict__, "k": x.k.index_select(2, perm), "v": x.v.index_select(2, perm),
                       "attn_mask": mask})
        o1 = impl.run(case, x, backward=False).o.double()
        o2 = impl.run(case, px, backward=False).o.double()
        diff = (o1 - o2).abs().nan_to_num(math.inf)
        bound = output_bound(case, x) + output_bound(case, px)
        assert (diff <= bound).all(), f"permuting the keys moved O by up to {diff.max():.3g} (bounds allow {bound.max():.3g})"


def test_batch_and_head_independence(attn_impl, attn_env):
    """Changing batch entry 0 (or head 0) leaves every other entry's output bitwise unchanged."""
    impl, env = attn_impl, attn_env
    strategy = cases_for(impl, env, dropout=False).map(lambda c: c.replace(batch=2, key_lengths=None))

    @for_all(impl, env, strategy, "batch_and_head_independence")
    def check(case):
        x = case.inputs(env.device)
        base = impl.run(case, x, backward=False).o
        bumped = Inputs(**{**x.__dict__, "q": _bump(x.q, 0), "k": _bump(x.k, 0), "v": _bump(x.v, 0)})
        moved = impl.run(case, bumped, backward=False).o
        assert torch.equal(base[1:], moved[1:]), "changing batch entry 0 changed batch entry 1"
        if case.heads_kv > 1:
            hb = Inputs(**{**x.__dict__, "k": _bump(x.k, (slice(None), 0)), "v": _bump(x.v, (slice(None), 0))})
            group = case.heads_q // case.heads_kv
            moved = impl.run(case, hb, backward=False).o
            assert torch.equal(base[:, group:], moved[:, group:]), \
                "changing K/V head 0 changed the output of query heads outside its group"


def _bump(t, index):
    out = t.clone()
    out[index] = -out[index] + 0.5
    return out


# --- determinism, inputs, metadata ----------------------------------------------------------

def test_deterministic(attn_impl, attn_env):
    """The same inputs (and dropout seed) give bitwise the same O and gradients, run after run."""
    impl, env = attn_impl, attn_env
    dropout = None if (impl.capabilities.dropout and impl.capabilities.deterministic_dropout) else False

    @for_all(impl, env, cases_for(impl, env, dropout=dropout), "deterministic")
    def check(case):
        x = case.inputs(env.device)
        backward = impl.capabilities.backward
        a, b = impl.run(case, x, backward=backward), impl.run(case, x, backward=backward)
        for name in ("o",) + (GRADS if backward else ()):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"{name} differs between two identical calls"


def test_inputs_not_mutated(attn_impl, attn_env):
    """q, k, v, dO and the mask are left exactly as they were."""
    impl, env = attn_impl, attn_env

    @for_all(impl, env, cases_for(impl, env), "inputs_not_mutated")
    def check(case):
        x = case.inputs(env.device)
        before = {n: t.clone() for n, t in x.__dict__.items() if t is not None}
        impl.run(case, x, backward=impl.capabilities.backward)
        for n, t in before.items():
            assert torch.equal(t, getattr(x, n)), f"{n} was modified by the call"


def test_output_shape_dtype_device(attn_impl, attn_env):
    """O has q's shape, dtype and device; gradients those of their inputs (checked by Implementation.run)."""
    impl, env = attn_impl, attn_env

    @for_all(impl, env, cases_for(impl, env, dropout=False), "output_shape_dtype_device")
    def check(case):
        impl.run(case, case.inputs(env.device), backward=impl.capabilities.backward)


# --- dropout ---------------------------------------------------------------------------------

def _dropout_cases(impl, env):
    return cases_for(impl, env, dropout=True, max_seqlen=min(env.max_seqlen, 48), max_head_dim=32).map(
        lambda c: c.replace(key_lengths=None, mask=None, causal=False, window=None))


def test_dropout_seeds(attn_impl, attn_env):
    """Same seed: same output. Different seed: different output (drawn where that must show:
    p = 0.5, >= 16 scores, inputs without a dominant key - one-hot attention can hide it)."""
    impl, env = attn_impl, attn_env
    require(impl, "deterministic_dropout")
    strategy = _dropout_cases(impl, env).filter(lambda c: c.seqlen_q * c.seqlen_k >= 16).map(
        lambda c: c.replace(dropout_p=0.5, distribution="uniform"))

    @for_all(impl, env, strategy, "dropout_seeds")
    def check(case):
        x = case.inputs(env.device)
        a = impl.run(case, x, backward=False).o
        assert torch.equal(a, impl.run(case, x, backward=False).o), "same seed gave different outputs"
        other = impl.run(case.replace(seed=(case.seed + 1) % 2**31), x, backward=False).o
        assert not torch.equal(a, other), "a different seed gave the same output"


def test_dropout_masks_differ_across_heads(attn_impl, attn_env):
    """Identical inputs in every batch entry and head, dropout on: no two entries may give the same
    output. An RNG offset that ignores the batch or head (or wraps at 2**32, where B*H*Nq*Nk passes
    it) hands several of them one mask. Drawn where different masks must show: p = 0.5, >= 256
    scores (two independent masks agree with probability <= 2**-256), uniform inputs."""
    impl, env = attn_impl, attn_env
    require(impl, "dropout")
    strategy = _dropout_cases(impl, env).map(lambda c: c.replace(
        batch=2, seqlen_q=max(c.seqlen_q, 16), seqlen_k=max(c.seqlen_k, 16), dropout_p=0.5, distribution="uniform"))

    @for_all(impl, env, strategy, "dropout_masks_differ_across_heads")
    def check(case):
        x = case.inputs(env.device)
        same = {name: _fill_with_first_entry(getattr(x, name)) for name in ("q", "k", "v")}
        o = impl.run(case, Inputs(**{**x.__dict__, **same}), backward=False).o
        entries = [(b, h) for b in range(case.batch) for h in range(case.heads_q)]
        for i, (b, h) in enumerate(entries):
            for b2, h2 in entries[i + 1:]:
                assert not torch.equal(o[b, h], o[b2, h2]), (
                    f"batch {b} head {h} and batch {b2} head {h2} gave the same output from the same inputs: "
                    "they got the same dropout mask")


def _fill_with_first_entry(t):
    """t with every (batch, head) slice replaced by slice (0, 0), its strides (layout) kept."""
    out = t.clone()
    out[...] = t[:1, :1]
    return out


def test_dropout_keep_rate(attn_impl, attn_env):
    """The keep-mask keeps 1 - p of the scores (binomial test, |z| < 5: a false alarm once in 3.5 million)."""
    impl, env = attn_impl, attn_env
    require(impl, "keep_mask")

    @for_all(impl, env, _dropout_cases(impl, env), "dropout_keep_rate")
    def check(case):
        keep = impl.keep_mask(case, env.device)
        n, p_keep = keep.numel(), 1.0 - case.dropout_p
        z = (keep.double().mean().item() - p_keep) / math.sqrt(p_keep * (1 - p_keep) / n)
        assert abs(z) < 5, f"kept fraction {keep.double().mean().item():.4f} of {n}, expected {p_keep} (z = {z:.1f})"


def test_dropout_unbiased(attn_impl, attn_env):
    """E[O with dropout] = O without (the 1/(1-p) rescaling): z-test over 32 seeds, |z| < 5."""
    impl, env = attn_impl, attn_env
    require(impl, "dropout")
    seeds = 32

    @for_all(impl, env, _dropout_cases(impl, env).map(lambda c: c.replace(dropout_p=0.5)), "dropout_unbiased")
    def check(case):
        x = case.inputs(env.device)
        plain = impl.run(case.replace(dropout_p=0.0), x, backward=False).o.double()
        if plain.norm() == 0:
            return
        # project every run on the no-dropout output: one scalar per seed, mean should be <plain, plain>
        proj = torch.tensor([(impl.run(case.replace(seed=(case.seed + s) % 2**31), x, backward=False).o.double() * plain).sum()
                             for s in range(seeds)])
        expected = (plain * plain).sum().item()
        se = proj.std().item() / math.sqrt(seeds)
        z = (proj.mean().item() - expected) / max(se, expected * 1e-6)
        assert abs(z) < 5, (f"mean over {seeds} seeds of <O, O_nodrop> is {proj.mean():.4g}, expected {expected:.4g} "
                            f"(z = {z:.1f}): dropout is biased (missing 1/(1-p)?)")


def test_dropout_gradient_matches_forward_mask(attn_impl, attn_env):
    """With the seed fixed, the backward is the derivative of the forward: directional finite
    differences (float32, Richardson-checked) agree with <grad, direction> - a backward that
    regenerates a different mask fails."""
    impl, env = attn_impl, attn_env
    require(impl, "backward", "deterministic_dropout", "float32")
    strategy = _dropout_cases(impl, env).map(lambda c: c.replace(dtype="float32", distribution="normal"))

    @for_all(impl, env, strategy, "dropout_gradient_matches_forward_mask")
    def check(case):
        x = case.inputs(env.device)
        g = torch.Generator().manual_seed(case.seed)
        w = torch.randn(x.q.shape, generator=g, dtype=torch.float64).to(x.q.device)
        dirs = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device) for t in (x.q, x.k, x.v)]
        grads = impl.run(case, Inputs(**{**x.__dict__, "do": w.to(x.q.dtype)}), backward=True)
        analytic = sum((gr.double() * d).sum().item() for gr, d in zip((grads.dq, grads.dk, grads.dv), dirs))

        def f(eps):
            moved = [(t.double() + eps * d).to(t.dtype) for t, d in zip((x.q, x.k, x.v), dirs)]
            xi = Inputs(**{**x.__dict__, "q": moved[0], "k": moved[1], "v": moved[2]})
            return (impl.run(case, xi, backward=False).o.double() * w).sum().item()

        eps = 1e-2
        fd1 = (f(eps) - f(-eps)) / (2 * eps)
        fd2 = (f(eps / 2) - f(-eps / 2)) / eps
        # error model: truncation ~ |fd1 - fd2| (Richardson), rounding ~ u32 * sum|O||w| / eps
        scale = sum(abs(v) for v in (fd1, fd2, analytic))
        rounding = 2.0**-24 * 64 * (impl.run(case, x, backward=False).o.double().abs() * w.abs()).sum().item() / eps
        tol = 4 * abs(fd1 - fd2) + 4 * rounding + 1e-12 * scale
        assert abs(fd2 - analytic) <= tol, (f"directional derivative {analytic:.6g} from backward, {fd2:.6g} "
                                            f"by finite differences (tolerance {tol:.3g})")
