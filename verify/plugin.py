"""pytest plugin (entry point ``pytest11``): point the property suite at any attention kernel.

    pytest --pyargs flashverify.properties --attn-impl=package.module:callable [--attn-impl=...]

Options live here, not in a conftest, because conftest ``addoption`` only runs for
initial conftests. Importing this module must stay cheap (no torch): pytest loads it for
every run in an environment where flashverify is installed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from . import BUILTIN_IMPLEMENTATIONS

PROFILES = ("dev", "ci", "thorough", "release")


def _register_profiles():
    """Our hypothesis profiles, used only by the property suite (global settings stay the user's)."""
    from hypothesis import HealthCheck, settings

    quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
             HealthCheck.differing_executors]
    common = dict(deadline=None, suppress_health_check=quiet, print_blob=True)
    settings.register_profile("flashverify-dev", max_examples=8, **common)
    settings.register_profile("flashverify-ci", max_examples=8, derandomize=True, database=None, **common)
    settings.register_profile("flashverify-thorough", max_examples=100, **common)
    settings.register_profile("flashverify-release", max_examples=300, **common)
    # for flashverify's own tests that hunt planted bugs: reproducible, and enough examples to find them
    settings.register_profile("flashverify-hunt", max_examples=60, derandomize=True, database=None, **common)


def pytest_addoption(parser):
    group = parser.getgroup("flashverify", "attention kernel verification")
    group.addoption("--attn-impl", action="append", default=[], metavar="MODULE:CALLABLE",
                    help="implementation under test: an SDPA-signature callable, an Implementation "
                         f"subclass/instance, or a built-in name ({', '.join(BUILTIN_IMPLEMENTATIONS)}); "
                         "repeatable")
    group.addoption("--attn-device", default=None, help="device for the inputs (default: cuda if available)")
    group.addoption("--attn-profile", choices=PROFILES, default=None,
                    help="hypothesis profile of the property suite (default: ci when $CI is set, else dev)")
    group.addoption("--attn-max-seqlen", type=int, default=None,
                    help="largest sequence length drawn (default: 96 under Triton's interpreter, 512 on a GPU)")
    group.addoption("--attn-repro-dir", default=None, help="also save each failure's reproducer here")
    group.addoption("--attn-timeout", type=float, default=300.0, metavar="SECONDS",
                    help="report a call that takes longer as hung and go on (default 300; 0 = no limit)")
    group.addoption("--attn-xfails", default=None, metavar="PATH",
                    help="expected failures, one per line: IMPL_SPEC PROPERTY REASON... ('#' comments)")
    group.addoption("--attn-report", default=None, metavar="PATH",
                    help="write the per-implementation, per-property summary as JSON")


@dataclass
class Env:
    """What the property suite needs to know about this run."""
    device: str
    profile: str
    max_seqlen: int
    repro_dir: str | None

    @property
    def settings(self):
        from hypothesis import settings
        return settings.get_profile(f"flashverify-{self.profile}")


_XFAILS = pytest.StashKey[dict]()


def pytest_configure(config):
    _register_profiles()
    config.stash[_XFAILS] = _xfails_file(config)
    for spec in config.getoption("--attn-impl"):
        if ":" not in spec and spec not in BUILTIN_IMPLEMENTATIONS:
            raise pytest.UsageError(f"--attn-impl must be 'package.module:callable' or a built-in name "
                                    f"({', '.join(BUILTIN_IMPLEMENTATIONS)}), got {spec!r}")


def pytest_generate_tests(metafunc):
    if "attn_impl" in metafunc.fixturenames:
        specs = metafunc.config.getoption("--attn-impl") or ["flashverify"]
        metafunc.parametrize("attn_impl", specs, indirect=True, ids=specs, scope="session")


_loaded: dict = {}

# (implementation spec, property) -> (worst error/bound ratio seen, tensor, case): the
# targeted search climbs toward these; the run summary reports them.
WORST: dict = {}


def record_worst(spec: str, prop: str, check, case) -> None:
    ratio = check.bound_ratio
    key = (spec, prop)
    if key not in WORST or ratio > WORST[key][0]:
        WORST[key] = (ratio, check.tensor, case)


@pytest.fixture(scope="session")
def attn_env(request) -> Env:
    import torch

    import flashverify.kernels as kernels  # switches the interpreter on where there is no GPU

    opt = request.config.getoption
    device = opt("--attn-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    profile = opt("--attn-profile") or ("ci" if os.environ.get("CI") else "dev")
    max_seqlen = opt("--attn-max-seqlen") or (96 if kernels.interpreting() else 512)
    return Env(device=device, profile=profile, max_seqlen=max_seqlen, repro_dir=opt("--attn-repro-dir"))


@pytest.fixture(scope="session")
def attn_impl(request, attn_env):
    """The implementation under test (loaded once per spec, capabilities probed on the device)."""
    from flashverify import impls
    from flashverify.impls import load

    timeout = request.config.getoption("--attn-timeout")
    impls.CALL_TIMEOUT = timeout if timeout and timeout > 0 else None
    spec = request.param
    if spec not in _loaded:
        try:
            impl = load(spec, device=attn_env.device)
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None
        impl.spec = spec
        _loaded[spec] = impl
    return _loaded[spec]


# --- expected failures ------------------------------------------------------------------------

def _xfails_file(config) -> dict:
    """(spec, property) -> reason, from --attn-xfails (like array-api-tests' xfails file)."""
    path = config.getoption("--attn-xfails")
    if not path:
        return {}
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split(None, 2)
            if len(parts) < 3:
                raise pytest.UsageError(f"{path}:{n}: expected 'IMPL_SPEC PROPERTY REASON', got {line!r}")
            out[(parts[0], parts[1].removeprefix("test_"))] = parts[2]
    return out


@pytest.fixture(autouse=True)
def _attn_expected_failure(request):
    """Mark a property as an expected failure when the implementation's `expected_failures` or
    the --attn-xfails file declares it. Strict (an unexpected pass fails, so stale declarations
    get removed) under a derandomized profile, where a pass means the failing example is gone;
    with a random search a pass may only mean the search missed it, so it is reported as XPASS."""
    if "attn_impl" not in request.fixturenames:
        return
    impl = request.getfixturevalue("attn_impl")
    prop = request.node.originalname.removeprefix("test_")
    declared = dict(getattr(impl, "expected_failures", {}) or {})
    declared.update({p: r for (s, p), r in request.config.stash[_XFAILS].items() if s == impl.spec})
    if prop in declared:
        env = request.getfixturevalue("attn_env")
        request.node.add_marker(pytest.mark.xfail(reason=declared[prop], strict=env.settings.derandomize))


# --- run summary ------------------------------------------------------------------------------

_OUTCOMES = pytest.StashKey[dict]()   # per session: (spec, property) -> (outcome, detail[, reproducer])


def _property_and_spec(item):
    spec = getattr(item, "callspec", None)
    if spec is None or "attn_impl" not in spec.params:
        return None
    return spec.params["attn_impl"], item.originalname or item.name


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    key = _property_and_spec(item)
    if key is None or (report.when != "call" and not report.skipped and not report.failed):
        return
    outcomes = item.config.stash.setdefault(_OUTCOMES, {})
    if hasattr(report, "wasxfail") and report.skipped:
        outcomes[key] = ("xfail", report.wasxfail)
    elif report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        outcomes[key] = ("skipped", reason.removeprefix("Skipped: "))
    elif report.failed:
        text = str(report.longrepr)
        first = next((ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")),
                     text.splitlines()[0] if text else "failed")
        repro = text[text.find("# flashverify reproducer"):] if "# flashverify reproducer" in text else ""
        outcomes[key] = ("failed", first, repro.split("\nYou can reproduce")[0].replace("\nE   ", "\n"))
    elif report.when == "call":
        outcomes[key] = ("passed", "")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    outcomes = config.stash.get(_OUTCOMES, {})
    if not outcomes:
        return
    tr = terminalreporter
    tr.section("flashverify: properties per implementation")
    records = []
    for spec in sorted({s for s, _ in outcomes}):
        tr.write_line(f"{spec}")
        for (s, prop), (status, detail, *rest) in sorted(outcomes.items()):
            if s != spec:
                continue
            worst = WORST.get((spec, prop.removeprefix("test_")))
            worst_text = f"  worst {worst[1]} error/bound {worst[0]:.3g}" if worst else ""
            tr.write_line(f"  {status.upper():8s} {prop.removeprefix('test_')}{worst_text}"
                          + (f"  - {detail}" if detail else ""))
            records.append({"implementation": spec, "property": prop.removeprefix("test_"), "outcome": status,
                            "detail": detail, "reproducer": rest[0] if rest else None,
                            "worst_bound_ratio": worst[0] if worst else None,
                            "worst_tensor": worst[1] if worst else None,
                            "worst_case": worst[2].as_dict() if worst else None})
    path = config.getoption("--attn-report")
    if path:
        import json
        with open(path, "w") as f:
            json.dump({"schema": "flashverify.property-report/1", "results": records}, f, indent=1)
        tr.write_line(f"report written to {path}")
