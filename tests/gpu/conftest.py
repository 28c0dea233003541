"""Fixtures of the GPU suite: every test here needs a CUDA device and is skipped without one."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "tests/gpu/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="session")
def cuda_ops():
    """The CUDA backend; on a CUDA machine a missing CuPy is a failure, not a skip."""
    from executor_service.ops.cuda_ops import CudaOps  # noqa: PLC0415 (imports CuPy)

    return CudaOps()
