"""`KernelRuntime` for CPU tensors: the CUDA backend's wrappers and kernels, run by the host emulator.

Every tensor is host memory, so every tensor counts as device memory and is addressed by its
`data_ptr()`. Launches are synchronous. `num_sms` is a parameter so that tests choose whether the
launch planner splits contexts (few SMs: rarely; an H100's 132: often).
"""

from __future__ import annotations

import torch

from executor_service.ops.kernel_runtime import KernelLaunch
from tests.helpers.cuda_emulator.host_library import EmulatorError, host_library


class EmulatedRuntime:
    """Runs kernels on the CPU; refuses tensors that are not on the CPU."""

    def __init__(self, num_sms: int = 132) -> None:
        self.sms = num_sms
        # Tests compare it before and after an op: a shape the wrappers hand to the torch fallback
        # launches nothing, and must not pass as a kernel result.
        self.num_launches = 0

    def launch(self, launch: KernelLaunch) -> None:
        if launch.device.type != "cpu":
            raise EmulatorError(f"the emulator runs kernels on CPU tensors, not on {launch.device}")
        library = host_library(launch.family, launch.name_expressions)
        library.launch(launch.name, launch.grid, launch.block, launch.args)
        self.num_launches += 1

    def num_sms(self, device: torch.device) -> int:
        return self.sms

    def is_device_tensor(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu"

    def kernel_address(self, tensor: torch.Tensor) -> int | None:
        return tensor.data_ptr() if tensor.device.type == "cpu" else None

    def upload(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.to(device)

    def synchronize(self, device: torch.device) -> None:
        return None
