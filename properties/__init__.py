"""The property suite (hypothesis) that the pytest plugin points at any attention implementation.

``flashverify.properties.strategies`` holds the strategies; ``test_properties`` the
properties, run with ``pytest --pyargs flashverify.properties --attn-impl=module:callable``.
"""


def replay(prop: str, impl_spec: str, example, device: str | None = None) -> None:
    """Check property `prop` (e.g. "forward_within_bounds") of an implementation on one example,
    without a search: what a failure's reproducer runs. Raises as the property did (AssertionError,
    or the implementation's own error); returns None when the property holds, and raises
    pytest's Skipped when the implementation does not declare what the property needs."""
    import torch

    from flashverify.impls import load
    from flashverify.plugin import Env

    from . import test_properties
    test = getattr(test_properties, f"test_{prop}", None)
    if test is None:
        known = sorted(n.removeprefix("test_") for n in dir(test_properties) if n.startswith("test_"))
        raise ValueError(f"prop: no property {prop!r}; the properties are {', '.join(known)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = Env(device=device, profile="dev", max_seqlen=1 << 30, repro_dir=None, replay=example)
    test(load(impl_spec, device=device), env)
