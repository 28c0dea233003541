"""Where the CUDA backend's kernels run: the interface between `CudaOps` and a kernel runtime.

The production runtime is `CupyRuntime` (CuPy on a CUDA device). The tests also run the same kernels
and the same wrappers on CPU tensors through a host emulator (tests/helpers/cuda_emulator), which is
why the wrappers reach the device only through this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from executor_service.ops.cuda_kernels import KernelFamily


@dataclass(frozen=True, slots=True)
class KernelLaunch:
    """One launch: kernel `name`, compiled together with `name_expressions` of `family`, over `grid`
    CTAs of `block` threads on `device`.

    `args` follow the kernel's parameters one to one: `pointer(...)` (np.uint64) for pointers,
    np.int32 / np.int64 / np.float32 for `int` / `long long` / `float`.
    """

    family: KernelFamily
    name_expressions: tuple[str, ...]
    name: str
    device: torch.device
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    args: tuple[Any, ...]


class KernelRuntime(Protocol):
    """Compiles and launches kernels from `kernels/`, and says which memory they can address."""

    def launch(self, launch: KernelLaunch) -> None:
        """Runs `launch` in stream order on its device."""
        ...

    def num_sms(self, device: torch.device) -> int:
        """Streaming multiprocessors of `device`: how many CTAs run at once, for launch planning."""
        ...

    def is_device_tensor(self, tensor: torch.Tensor) -> bool:
        """True when `tensor` lives in the kernels' own (device) memory."""
        ...

    def kernel_address(self, tensor: torch.Tensor) -> int | None:
        """The address a kernel dereferences for `tensor`'s data, or None when kernels cannot reach it
        (pageable host memory)."""
        ...

    def upload(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`host` (small launch metadata) on `device`, copied in stream order without a host sync."""
        ...

    def synchronize(self, device: torch.device) -> None:
        """Returns when everything launched on `device`'s current stream is done."""
        ...


def pointer(tensor: torch.Tensor | None) -> np.uint64:
    """A kernel argument for `T*`: the tensor's data address (null for None)."""
    return np.uint64(0 if tensor is None else tensor.data_ptr())
