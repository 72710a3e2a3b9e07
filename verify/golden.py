"""Golden results: errors and memory scaling a release must not regress.

One JSON file per platform in ``golden/`` (``cpu-interpreter-avx2.json``, ``nvidia-h100-80gb-hbm3.json``,
...; see platform_name), keyed by implementation, then by case (errors) or by pass (memory). Schema
``flashverify.golden/1``. Written only by ``flashverify golden update``, which prints the diff;
``flashverify golden check`` is the gate.

The gate is one-sided: a metric worse than the golden by more than its slack fails, a better
one passes and is reported as an improvement.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from importlib import resources

SCHEMA = "flashverify.golden/1"

# Errors of a deterministic kernel on seeded inputs reproduce bit for bit on one platform; the
# slack absorbs library updates that reorder a reference's sums. A real precision regression is
# far larger: one extra rounding of a tensor multiplies its error by ~1.4, accumulating in bf16
# by several times.
ERROR_SLACK = 0.10
ERROR_FLOOR = 1e-9          # absolute: below this an error (or error/bound) counts as unchanged
GATED_ERRORS = ("rel_fro", "bound_ratio")   # max_ulp and the naive ratio are recorded, not gated
# Allocator granularity (512-byte blocks on CUDA) and workspace-size heuristics of a library
# move a peak by a few percent at most; an N x N buffer moves it by orders of magnitude.
MEMORY_SLACK = 0.05
EXPONENT_SLACK = 0.05
# Sizes of the memory-scaling fit, per platform kind: the interpreter is slow, the GPU is not.
MEMORY_NS = {"cpu": (64, 128, 256, 512), "cuda": (1024, 2048, 4096, 8192, 16384)}


class GoldenError(Exception):
    """A golden file that is missing, corrupt or of another schema."""


def golden_dir() -> str:
    return str(resources.files("flashverify.golden_files"))


def platform_name(device) -> str:
    """Where golden errors reproduce bit for bit: the GPU model as a file-name slug
    ('nvidia-h100-80gb-hbm3'), or the interpreter and the CPU's vector width
    ('cpu-interpreter-avx2'). Why the width: numpy (the interpreter's sums and dots) and torch
    (the references) reduce in another order with wider vectors, so the same kernel measures
    other errors (an AVX2 machine moved 5 of 560 metrics by 11-24 % against a file measured on
    a CPU whose width was not recorded)."""
    import torch
    if torch.device(device).type != "cuda":
        return f"cpu-interpreter-{torch.backends.cpu.get_cpu_capability().lower()}"
    from flashverify.kernels.attention import device_slug
    return device_slug(device)


def path_for(platform: str, directory: str | None = None) -> str:
    return os.path.join(directory or golden_dir(), f"{platform}.json")


def read(path: str, schemas: tuple = (SCHEMA,), what: str = "golden file",
         remedy: str = "restore it from git or rewrite it with `flashverify golden update`") -> dict:
    """The golden file at `path` (or another `what` of the golden layout: `schemas`), validated;
    GoldenError says what is wrong and how to fix it."""
    if not os.path.exists(path):
        raise GoldenError(f"no {what} {path}" + (": create it with `flashverify golden update`"
                                                  if what == "golden file" else ""))
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GoldenError(f"{what} {path} is not valid JSON ({e}); {remedy}") from None
    if not isinstance(data, dict) or data.get("schema") not in schemas:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise GoldenError(f"{what} {path} has schema {found!r}, this flashverify reads "
                          f"{' or '.join(map(repr, schemas))}; {remedy}")
    if not isinstance(data.get("implementations"), dict):
        raise GoldenError(f"{what} {path} has no 'implementations' object")
    return data


def write(path: str, data: dict) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".golden-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a golden file is for everyone
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# --- collecting fresh results -------------------------------------------------------------------

def collect_errors(impl, cases: dict, device, progress=None) -> dict:
    """case label -> tensor -> error metrics (issue 2's metrics and bounds); a case whose call
    raised or misbehaved maps to {"raised": message} and the run goes on."""
    from .evaluate import evaluate
    from .impls import ImplementationError, Unsupported
    out = {}
    for label, case in cases.items():
        if not supports(impl, case):
            continue
        inputs = case.inputs(device)
        try:
            result = impl.run(case, inputs, backward=impl.capabilities.backward)
        except Unsupported:   # declined by the kernel's own rules: not measured, like an undeclared feature
            continue
        except ImplementationError as e:
            out[label] = {"raised": str(e).splitlines()[0][:300]}
            continue
        keep = impl.keep_mask(case, device) if case.dropout_p else None
        out[label] = {c.tensor: {"max_abs": c.error.max_abs, "p99_abs": c.error.p99_abs, "rmse": c.error.rmse,
                                 "max_ulp": c.error.max_ulp, "rel_fro": c.error.rel_fro,
                                 "bound_ratio": c.bound_ratio, "reference_ratio": c.reference_ratio,
                                 "failures": c.failures}
                      for c in evaluate(case, inputs, result, keep=keep)}
        if progress:
            progress(label)
    return out


def supports(impl, case) -> bool:
    """Whether the implementation declares what `case` needs (dtype, observable dropout, GQA, head dim)."""
    caps = impl.capabilities
    return (case.dtype in caps.dtypes and (case.dropout_p == 0 or caps.keep_mask)
            and (case.heads_q == case.heads_kv or caps.gqa) and caps.head_dims[0] <= case.head_dim <= caps.head_dims[1])


def memory_base(device):
    """The memory-scaling problem: causal fp16, as in the H100 anchors (B=1, H=8, D=64) on a GPU,
    scaled down for the interpreter."""
    from .case import Case
    if device_kind(device) == "cuda":
        return Case(batch=1, heads_q=8, heads_kv=8, head_dim=64, dtype="float16", causal=True)
    return Case(batch=1, heads_q=2, heads_kv=2, head_dim=32, dtype="float16", causal=True)


def device_kind(device) -> str:
    """'cuda' or 'cpu' (Triton's interpreter): what sizes and case profiles are keyed by."""
    import torch
    return "cuda" if torch.device(device).type == "cuda" else "cpu"


def collect_memory(impl, device, ns=None) -> dict:
    """'forward' / 'forward+backward' -> memory.Scaling as a dict (plus the base case)."""
    from .memory import scaling
    if device_kind(device) == "cpu" and getattr(impl, "cpu_memory_untracked", None):
        raise NotImplementedError(impl.cpu_memory_untracked)
    base = memory_base(device)
    ns = ns or MEMORY_NS[device_kind(device)]
    out = {}
    for name, backward in (("forward", False), ("forward+backward", True)):
        if backward and not impl.capabilities.backward:
            continue
        out[name] = {**scaling(impl, base, ns, device, backward).as_dict(), "case": base.as_dict()}
    return out


def memory_entry(impl, device) -> dict:
    """{'memory': scaling} of one implementation, measured in this process (its own allocator peak);
    memory that cannot be measured here is recorded as {'memory_error': why} and the run goes on."""
    import torch
    try:
        return {"memory": collect_memory(impl, device)}
    except Exception as e:  # noqa: BLE001 - e.g. FlexAttention under the CPU tracker: say so, go on
        return {"memory_error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    finally:   # naive attention at the largest N leaves ~20 GiB cached: give it back to the --jobs workers
        if device_kind(device) == "cuda":
            torch.cuda.empty_cache()


def environment(device) -> dict:
    import platform

    import numpy as np
    import torch
    import triton

    from . import __version__
    return {"flashverify": __version__, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if device_kind(device) == "cuda" else
            f"cpu (Triton interpreter, {torch.backends.cpu.get_cpu_capability()})", "numpy": np.__version__}


def source_fingerprint() -> str:
    """sha256 (first 16 hex digits) of the installed flashverify's code and tile tables: the
    harness, the properties and the bundled kernel. Results of different sources must not be
    merged into one verdict (a release run split over machines or sessions)."""
    import hashlib
    from importlib import resources

    digest = hashlib.sha256()
    for package in ("flashverify", "flashverify.kernels", "flashverify.properties"):
        root = resources.files(package)
        files = [f for f in root.iterdir() if f.name.endswith(".py")]
        if package == "flashverify.kernels" and root.joinpath("tiles").is_dir():
            files += [f for f in root.joinpath("tiles").iterdir() if f.name.endswith(".json")]
        for f in sorted(files, key=lambda f: f.name):
            digest.update(f"{package}/{f.name}\0".encode() + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# --- the gate -----------------------------------------------------------------------------------

@dataclass
class Change:
    """One gated metric, fresh against golden."""
    implementation: str
    where: str          # "errors dense/float16/N64/D64 o" or "memory forward+backward N=512"
    metric: str
    golden: float
    fresh: float
    verdict: str        # "regressed" | "improved" | "unchanged" | "missing"

    def __str__(self):
        if self.verdict == "missing":
            return f"{self.implementation}: {self.where} {self.metric}: in the golden file, not measured now"
        change = (self.fresh / self.golden - 1) * 100 if self.golden else math.inf
        if self.metric == "peak_bytes":
            return (f"{self.implementation}: {self.where} {self.metric} {human_bytes(self.golden)} -> "
                    f"{human_bytes(self.fresh)} ({change:+.1f}%) {self.verdict}")
        if self.metric == "exponent":
            return (f"{self.implementation}: {self.where} {self.metric} {self.golden:.3f} -> {self.fresh:.3f} "
                    f"({self.fresh - self.golden:+.3f}) {self.verdict}")
        return (f"{self.implementation}: {self.where} {self.metric} {self.golden:.4g} -> {self.fresh:.4g} "
                f"({change:+.1f}%) {self.verdict}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _verdict(golden: float, fresh: float, slack: float, floor: float = 0.0) -> str:
    if fresh is None or (isinstance(fresh, float) and math.isnan(fresh)):
        return "regressed"
    if fresh > golden * (1 + slack) + floor:
        return "regressed"
    if fresh < golden * (1 - slack) - floor:
        return "improved"
    return "unchanged"


def compare(golden: dict, fresh: dict, as_name: dict | None = None) -> list[Change]:
    """Every gated metric of `fresh` (same layout as golden['implementations']) against the golden.
    `as_name` maps a fresh implementation to the golden entry it must match (default: its own)."""
    as_name = as_name or {}
    changes = []
    for impl, result in fresh.items():
        key = as_name.get(impl, impl)
        ref = golden["implementations"].get(key)
        if ref is None:
            raise GoldenError(f"the golden file has no entry {key!r} (it has "
                              f"{', '.join(sorted(golden['implementations']))})")
        for label, tensors in ref.get("errors", {}).items():
            for tensor, metrics in tensors.items():
                for metric in GATED_ERRORS:
                    where = f"errors {label} {tensor}"
                    got = result.get("errors", {}).get(label, {}).get(tensor)
                    if got is None:
                        changes.append(Change(impl, where, metric, metrics[metric], math.nan, "missing"))
                        continue
                    changes.append(Change(impl, where, metric, metrics[metric], got[metric],
                                          _verdict(metrics[metric], got[metric], ERROR_SLACK, ERROR_FLOOR)))
        for pass_name, scaling in ref.get("memory", {}).items():
            got = result.get("memory", {}).get(pass_name)
            if got is None:
                changes.append(Change(impl, f"memory {pass_name}", "peak_bytes", scaling["peak_bytes"][-1],
                                      math.nan, "missing"))
                continue
            for n, want in zip(scaling["n"], scaling["peak_bytes"]):
                have = dict(zip(got["n"], got["peak_bytes"])).get(n)
                verdict = "missing" if have is None else _verdict(want, have, MEMORY_SLACK)
                changes.append(Change(impl, f"memory {pass_name} N={n}", "peak_bytes", want,
                                      math.nan if have is None else have, verdict))
            changes.append(Change(impl, f"memory {pass_name}", "exponent", scaling["exponent"], got["exponent"],
                                  _verdict(0.0, got["exponent"] - scaling["exponent"], 0.0, EXPONENT_SLACK)))
    return changes


def diff(old: dict | None, new: dict) -> list[str]:
    """Human-readable lines: what `flashverify golden update` changes."""
    if old is None:
        return [f"new golden file: {', '.join(sorted(new['implementations']))}"]
    lines = []
    both = {k: v for k, v in new["implementations"].items() if k in old["implementations"]}
    for change in compare(old, both):
        if change.verdict != "unchanged":
            lines.append(str(change))
    for impl in sorted(set(old["implementations"]) - set(new["implementations"])):
        lines.append(f"{impl}: kept from the old file (not re-measured)")
    for impl in sorted(set(new["implementations"]) - set(old["implementations"])):
        lines.append(f"{impl}: added")
    return lines
