import pytest


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    """Save which GPU and which torch/triton produced the numbers."""
    import torch
    import triton
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        machine_info["gpu"] = {"name": p.name, "sms": p.multi_processor_count,
                               "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"}
