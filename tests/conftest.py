import pytest
import torch

import flashverify.kernels  # noqa: F401  (switches on the interpreter where there is no GPU: before Triton's import)
# Imported before any test, not first inside one: the pytester fixture restores sys.modules after
# its test, so torch modules first imported there are dropped, and importing them again fails
# (torch._inductor.test_operators defines an operator library once per process). Before session
# 18, importing flashverify.kernels imported dynamo (through a torch.compiler.disable). After
# flashverify.kernels: dynamo imports Triton, which must see TRITON_INTERPRET first.
import torch._dynamo  # noqa: E402,F401
import torch._inductor.config  # noqa: E402,F401


@pytest.fixture(scope="session")
def device():
    """Where the bundled kernel runs: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"

pytest_plugins = ["pytester"]
