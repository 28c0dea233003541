"""The kernel suite runs every test on two targets: `cuda` (a GPU, marked `gpu`, skipped without one)
and `emulated` (the same kernels and wrappers on the CPU through tests/helpers/cuda_emulator).

The emulated target checks the kernels' logic (indexing, masking, online softmax, splits, barriers);
only the GPU target checks what the hardware adds (memory model, alignment faults, CuPy, streams,
speed). The emulator is about a thousand times slower than a GPU, so `make test` runs the part of the
emulated matrix that a module's `EMULATED_IN_MAKE_TEST[test name](**params)` picks (every kernel
instantiation at least once) and marks the rest `slow`; `make test-emulated` runs all of it (about 9 minutes on 2 cores).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.cuda_emulator.emulated_runtime import EmulatedRuntime
from tests.helpers.cuda_emulator.host_library import COMPILER, compiler_available
from tests.kernels.kernel_checks import KernelTarget

TARGETS = ("cuda", "emulated")
EMULATED_NUM_SMS = 132


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_compiler = pytest.mark.skip(reason=f"the kernel emulator needs a C++ compiler ({COMPILER})")
    for item in items:
        if "tests/kernels/" not in str(item.path).replace("\\", "/"):
            continue
        callspec = getattr(item, "callspec", None)
        target = callspec.params.get("kernel_target") if callspec is not None else None
        if target == "cuda":
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(no_gpu)
        elif target == "emulated":
            if not compiler_available():
                item.add_marker(no_compiler)
            in_make_test = getattr(item.module, "EMULATED_IN_MAKE_TEST", {}).get(item.originalname)
            params = {name: value for name, value in callspec.params.items() if name != "kernel_target"}
            if in_make_test is not None and not in_make_test(**params):
                item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", params=TARGETS)
def kernel_target(request: pytest.FixtureRequest) -> KernelTarget:
    """On a CUDA machine a missing CuPy is a failure of the `cuda` target, not a skip."""
    from executor_service.ops.cuda_ops import CudaOps

    if request.param == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        return KernelTarget("cuda", device, CudaOps(), num_sms)
    return KernelTarget(
        "emulated", torch.device("cpu"), CudaOps(runtime=EmulatedRuntime(EMULATED_NUM_SMS)), EMULATED_NUM_SMS
    )
