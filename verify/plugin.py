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
    group.addoption("--attn-shards", type=int, default=1, metavar="K",
                    help="split each property's examples into K tests with independent random streams "
                         "(for pytest-xdist, or a long profile split over runs with -k shard2of4); "
                         "random profiles only")


@dataclass
class Env:
    """What the property suite needs to know about this run."""
    device: str
    profile: str
    max_seqlen: int
    repro_dir: str | None
    shards: int = 1   # --attn-shards: this test runs 1/shards of the profile's examples
    replay: object = None  # check this one example instead of searching (flashverify.properties.replay)

    @property
    def settings(self):
        from hypothesis import settings
        profile = settings.get_profile(f"flashverify-{self.profile}")
        if self.shards == 1:
            return profile
        return settings(profile, max_examples=-(-profile.max_examples // self.shards))


_XFAILS = pytest.StashKey[dict]()


def pytest_configure(config):
    _register_profiles()
    config.pluginmanager.register(_Summary(), "flashverify-summary")
    config.stash[_XFAILS] = _xfails_file(config)
    shards = config.getoption("--attn-shards")
    if shards < 1:
        raise pytest.UsageError(f"--attn-shards must be an int >= 1, got {shards}")
    if shards > 1 and _profile(config) == "ci":
        raise pytest.UsageError(f"--attn-shards {shards} needs a random profile (dev, thorough, release): "
                                f"the derandomized '{_profile(config)}' profile would draw the same examples in every shard")
    for spec in config.getoption("--attn-impl"):
        if ":" not in spec and spec not in BUILTIN_IMPLEMENTATIONS:
            raise pytest.UsageError(f"--attn-impl must be 'package.module:callable' or a built-in name "
                                    f"({', '.join(BUILTIN_IMPLEMENTATIONS)}), got {spec!r}")


def _profile(config) -> str:
    return config.getoption("--attn-profile") or ("ci" if os.environ.get("CI") else "dev")


def pytest_generate_tests(metafunc):
    if "attn_impl" in metafunc.fixturenames:
        specs = metafunc.config.getoption("--attn-impl") or ["flashverify"]
        metafunc.parametrize("attn_impl", specs, indirect=True, ids=specs, scope="session")
    shards = metafunc.config.getoption("--attn-shards")
    if shards > 1 and "attn_env" in metafunc.fixturenames:
        metafunc.parametrize("attn_env", range(shards), indirect=True,
                             ids=[f"shard{i + 1}of{shards}" for i in range(shards)], scope="session")


_loaded: dict = {}

# (implementation spec, property) -> (worst error/bound ratio seen, tensor, case): the
# targeted search climbs toward these; the run summary reports them.
WORST: dict = {}


# (implementation spec, property) -> {reason: count} of drawn cases the implementation declined
# (impls.Unsupported): skipped, and shown in the summary so a narrow kernel is visibly narrow.
DECLINED: dict = {}


def record_declined(spec: str, prop: str, reason: str) -> None:
    counts = DECLINED.setdefault((spec, prop), {})
    counts[reason] = counts.get(reason, 0) + 1


def record_worst(spec: str, prop: str, check, case) -> None:
    ratio = check.bound_ratio
    key = (spec, prop)
    if key not in WORST or ratio > WORST[key][0]:
        WORST[key] = (ratio, check.tensor, case)


def _env(config) -> Env:
    import torch

    import flashverify.kernels as kernels  # switches the interpreter on where there is no GPU

    opt = config.getoption
    device = opt("--attn-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    max_seqlen = opt("--attn-max-seqlen") or (96 if kernels.interpreting() else 512)
    return Env(device=device, profile=_profile(config), max_seqlen=max_seqlen,
               repro_dir=opt("--attn-repro-dir"), shards=opt("--attn-shards"))


@pytest.fixture(scope="session")
def attn_env(request) -> Env:
    return _env(request.config)


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
        _loaded[spec] = impl
    return _loaded[spec]


# --- expected failures ------------------------------------------------------------------------

def _xfails_file(config) -> dict:
    """(spec, property) -> reason, from --attn-xfails (like array-api-tests' xfails file)."""
    path = config.getoption("--attn-xfails")
    if not path:
        return {}
    if not os.path.isfile(path):
        raise pytest.UsageError(f"--attn-xfails: no such file {path!r}")
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
# The outcome of each property is worked out where it ran (pytest_runtest_makereport) and rides
# on the report's user_properties, which pytest-xdist ships to the controller; the controller
# collects them (pytest_runtest_logreport) and prints the summary. So `-n 8` works too.

_USER_PROPERTY = "flashverify"


def _property_and_spec(item):
    spec = getattr(item, "callspec", None)
    if spec is None or "attn_impl" not in spec.params:
        return None
    return spec.params["attn_impl"], (item.originalname or item.name).removeprefix("test_")


def _outcome(report) -> tuple[str, str, str | None]:
    if hasattr(report, "wasxfail") and report.skipped:
        return "xfail", report.wasxfail, None
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return "skipped", reason.removeprefix("Skipped: "), None
    if report.failed:
        text = str(report.longrepr)
        first = next((ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")),
                     text.splitlines()[0] if text else "failed")
        repro = text[text.find("# flashverify reproducer"):] if "# flashverify reproducer" in text else None
        return "failed", first, repro and repro.split("\nYou can reproduce")[0].replace("\nE   ", "\n")
    if hasattr(report, "wasxfail"):
        return "xpassed", report.wasxfail, None
    return "passed", "", None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    key = _property_and_spec(item)
    if key is None or (report.when != "call" and not report.skipped and not report.failed):
        return
    status, detail, repro = _outcome(report)
    worst = WORST.get(key)
    shards = item.config.getoption("--attn-shards")
    shard = item.callspec.params.get("attn_env") if shards > 1 else None
    report.user_properties.append((_USER_PROPERTY, {
        "implementation": key[0], "property": key[1], "outcome": status, "detail": detail, "reproducer": repro,
        "worst_bound_ratio": worst[0] if worst else None, "worst_tensor": worst[1] if worst else None,
        "worst_case": worst[2].as_dict() if worst else None, "declined": DECLINED.get(key, {}),
        **({"shards": [shard + 1], "of_shards": shards} if shard is not None else {})}))


_PRECEDENCE = ("failed", "xpassed", "xfail", "passed", "skipped")


def merge_records(a: dict, b: dict) -> dict:
    """One property's record from the records of its shards (--attn-shards), of one run or of
    several: the most severe outcome (with its detail and reproducer), the worst ratio, the
    declined cases summed, the shards that ran listed."""
    first, other = (a, b) if _PRECEDENCE.index(a["outcome"]) <= _PRECEDENCE.index(b["outcome"]) else (b, a)
    merged = dict(first)
    ratios = [r for r in (a, b) if r["worst_bound_ratio"] is not None]
    if ratios:
        worst = max(ratios, key=lambda r: r["worst_bound_ratio"])
        merged.update({k: worst[k] for k in ("worst_bound_ratio", "worst_tensor", "worst_case")})
    declined = dict(a.get("declined") or {})
    for reason, n in (b.get("declined") or {}).items():
        declined[reason] = declined.get(reason, 0) + n
    merged["declined"] = declined
    merged["shards"] = sorted(set(a.get("shards", [])) | set(b.get("shards", [])))
    return merged


def summary_line(what: str, record: dict) -> str:
    """One property's line in a run summary (pytest's, and `flashverify merge-properties`)."""
    worst = (f"  worst {record['worst_tensor']} error/bound {record['worst_bound_ratio']:.3g}"
             if record["worst_bound_ratio"] is not None else "")
    partial = f"  ({coverage(record)})" if coverage(record) else ""
    return (f"{record['outcome'].upper():8s} {what}{worst}{partial}"
            + (f"  - {record['detail']}" if record["detail"] else ""))


PROPERTY_REPORT_SCHEMA = "flashverify.property-report/2"


def run_description(env: Env) -> dict:
    """What a property report's results depend on besides the records: the drawn space (profile,
    shard count, longest sequence), the machine and versions, and the flashverify source (harness,
    properties, bundled kernel). `merge-properties` joins only reports that agree on all of it."""
    from .golden import environment, source_fingerprint
    return {"profile": env.profile, "of_shards": env.shards, "max_seqlen": env.max_seqlen,
            "environment": environment(env.device), "source": source_fingerprint()}


def write_property_report(path: str, records: list, run: dict) -> None:
    """The --attn-report JSON: the run's description and one record per (implementation, property)."""
    import json
    with open(path, "w") as f:
        json.dump({"schema": PROPERTY_REPORT_SCHEMA, "run": run, "results": records}, f, indent=1)


def coverage(record: dict) -> str:
    """'' when the record covers the whole profile, else which shards ran ('shards 1, 3 of 4 ran')."""
    ran, of = record.get("shards", []), record.get("of_shards")
    if not of or len(ran) == of:
        return ""
    return f"only shard{'s' if len(ran) > 1 else ''} {', '.join(map(str, ran))} of {of} ran"


class _Summary:
    """Per-run collector (one per pytest config, so pytester's nested runs keep their own)."""

    def __init__(self):
        self.outcomes: dict = {}   # (spec, property) -> record

    def pytest_runtest_logreport(self, report):
        for name, record in report.user_properties:
            if name == _USER_PROPERTY:
                key = (record["implementation"], record["property"])
                self.outcomes[key] = merge_records(self.outcomes[key], record) if key in self.outcomes else record

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not self.outcomes:
            return
        tr = terminalreporter
        tr.section("flashverify: properties per implementation")
        records = []
        for spec in sorted({s for s, _ in self.outcomes}):
            tr.write_line(f"{spec}")
            for (s, prop), r in sorted(self.outcomes.items()):
                if s != spec:
                    continue
                tr.write_line("  " + summary_line(prop, r))
                declined = r.get("declined") or {}
                if declined and r["outcome"] != "skipped":
                    top = max(declined, key=declined.get)
                    tr.write_line(f"           {sum(declined.values())} drawn cases declined by the implementation"
                                  f" (most often: {top[:160]})")
                records.append(r)
        path = config.getoption("--attn-report")
        if path:
            write_property_report(path, records, run_description(_env(config)))
            tr.write_line(f"report written to {path}")
