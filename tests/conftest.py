import pytest
import torch

import flashverify.kernels  # noqa: F401  (switches on the interpreter where there is no GPU)


@pytest.fixture(scope="session")
def device():
    """Where the bundled kernel runs: the GPU if there is one, else the CPU interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"

pytest_plugins = ["pytester"]
