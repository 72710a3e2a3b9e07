"""Paste-and-run reproducers for failing cases."""

from __future__ import annotations

import os
import re

from .case import Case


def reproducer(impl_spec: str, case: Case, device: str, property_name: str, detail: str = "",
               backward: bool = True, title: str | None = None) -> str:
    """A standalone Python snippet that rebuilds the exact inputs and re-runs the check."""
    return f'''# flashverify reproducer: {title or f"{property_name} failed for {impl_spec}"}
{("# " + detail.replace(chr(10), chr(10) + "# ")) if detail else ""}
import torch
from flashverify.case import Case
from flashverify.evaluate import evaluate
from flashverify.impls import load

case = {case!r}
impl = load({impl_spec!r}, device={device!r})
inputs = case.inputs({device!r})
out = impl.run(case, inputs, backward={backward!r} and impl.capabilities.backward)
keep = impl.keep_mask(case, {device!r}) if case.dropout_p else None
for check in evaluate(case, inputs, out, keep=keep):
    print(check.tensor, f"rel {{check.error.rel_fro:.3e}}", f"bound ratio {{check.bound_ratio:.3f}}",
          f"naive ratio {{check.reference_ratio}}", check.failures or "ok")
'''


def property_reproducer(impl_spec: str, example, device: str, property_name: str) -> str:
    """A standalone snippet that re-checks one property on the failing example (the property's own
    check, not a generic one: a dropout, determinism or mpmath failure shows as it did)."""
    return f'''# flashverify reproducer: {property_name} failed for {impl_spec}
from flashverify.case import Case
from flashverify.properties import replay

example = {example!r}
replay({property_name!r}, {impl_spec!r}, example, device={device!r})  # raises as the property did
print("{property_name} holds on this example")
'''


def save(directory: str, impl_spec: str, property_name: str, text: str) -> str:
    """Write a reproducer under `directory`; returns its path."""
    os.makedirs(directory, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{property_name}-{impl_spec}")[:120]
    path = os.path.join(directory, stem + ".py")
    with open(path, "w") as f:
        f.write(text)
    return path
