"""Measuring cases in parallel processes (``--jobs N``).

On a GPU, a run of a case profile or a targeted search is dominated by compiling: every feature x
dtype x head dim is its own Triton (or FlexAttention) specialization, compiled on one CPU core.
Spreading the cases over processes uses the other cores; the GPU work itself is small. Each worker
loads the implementation from its spec (a built-in name or 'module:attr') once and keeps it, so a
compiled FlexAttention or a probed callable is reused. Results do not depend on the number of jobs:
a case is measured the same way in any process; memory scaling stays in the calling process.
"""

from __future__ import annotations

import multiprocessing as mp

_IMPLS: dict = {}


def _impl(spec: str, device: str):
    from .impls import load
    if (spec, device) not in _IMPLS:
        _IMPLS[spec, device] = load(spec, device=device)
    return _IMPLS[spec, device]


def _errors(task):
    from .golden import collect_errors
    import torch
    spec, device, label, case = task
    result = collect_errors(_impl(spec, device), {label: case}, device).get(label)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()   # N idle workers must not sit on the memory a large case needs
    return label, result


def _search(task):
    from .report import worst_case
    spec, device, examples, shard = task
    return worst_case(_impl(spec, device), spec, device, examples, shard=shard)


class Workers:
    """A pool of `jobs` spawned processes (none for jobs=1: everything runs here, in order)."""

    def __init__(self, jobs: int, device: str):
        self.jobs, self.device = jobs, device
        self._pool = mp.get_context("spawn").Pool(jobs) if jobs > 1 else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.terminate()

    def errors(self, spec: str, impl, cases: dict, progress=None) -> dict:
        """golden.collect_errors over the processes, in the cases' order."""
        from .golden import collect_errors, supports
        if self._pool is None:
            return collect_errors(impl, cases, self.device, progress=progress)
        tasks = [(spec, self.device, label, case) for label, case in cases.items() if supports(impl, case)]
        found = {}
        for label, result in self._pool.imap_unordered(_errors, tasks):
            if result is not None:   # None: declined (Unsupported), as in the serial loop
                found[label] = result
            if progress:
                progress(label)
        return {label: found[label] for label in cases if label in found}

    def worst_case(self, spec: str, impl, examples: int) -> dict | None:
        """The targeted search, as `jobs` independent searches of examples/jobs each (seeded, so
        reproducible); the worst of their worst cases."""
        from .report import worst_case
        if self._pool is None:
            return worst_case(impl, spec, self.device, examples)
        per_shard = -(-examples // self.jobs)
        results = self._pool.map(_search, [(spec, self.device, per_shard, shard) for shard in range(self.jobs)])
        found = [r for r in results if r and "bound_ratio" in r]
        if not found:
            return next((r for r in results if r), None)
        return max(found, key=lambda r: r["bound_ratio"])
