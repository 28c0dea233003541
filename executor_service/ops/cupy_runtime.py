"""The kernel runtime on a CUDA device: CuPy compiles once, launches on torch's current stream.

Kernels are compiled by CuPy's `RawModule` (NVRTC) the first time a (family, instantiation set) is
used on a device, once per process; CuPy's on-disk kernel cache (`CUPY_CACHE_DIR`, default
`~/.cupy/kernel_cache`) makes later processes skip NVRTC. Tensors are handed to kernels as raw device
pointers: torch and CuPy share the CUDA context, so nothing is copied or converted.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import torch

from executor_service.ops.cuda_kernels import COMPILE_OPTIONS, KernelFamily
from executor_service.ops.kernel_runtime import KernelLaunch


def import_cupy() -> ModuleType:
    """CuPy, or ImportError saying what to install when it is missing or sees no GPU."""
    try:
        import cupy
    except ImportError as error:
        raise ImportError(
            "the cuda ops backend needs CuPy: pip install 'pagewire[cuda13]' (cupy-cuda13x, for CUDA 13) or "
            f"'pagewire[cuda12]' (cupy-cuda12x), or use --attention-backend torch ({error})"
        ) from error
    try:
        num_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        raise ImportError(f"CuPy is installed but cannot reach a CUDA device: {error}") from error
    if num_devices == 0:
        raise ImportError("CuPy is installed but sees no CUDA device")
    return cupy


@functools.cache
def _module(family: KernelFamily, name_expressions: tuple[str, ...]) -> Any:
    return import_cupy().RawModule(
        code=family.source(), options=COMPILE_OPTIONS, name_expressions=list(name_expressions)
    )


@functools.cache
def _kernel(family: KernelFamily, name_expressions: tuple[str, ...], name: str, device_index: int) -> Any:
    cupy = import_cupy()
    with cupy.cuda.Device(device_index):
        return _module(family, name_expressions).get_function(name)


@functools.cache
def _external_stream(handle: int, device_index: int) -> Any:
    return import_cupy().cuda.ExternalStream(handle, device_index)


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


class CupyRuntime:
    """`KernelRuntime` on CUDA devices; constructing it raises ImportError without CuPy or a GPU."""

    def __init__(self) -> None:
        self.cupy = import_cupy()

    def launch(self, launch: KernelLaunch) -> None:
        index = device_index(launch.device)
        kernel = _kernel(launch.family, launch.name_expressions, launch.name, index)
        stream = _external_stream(torch.cuda.current_stream(launch.device).cuda_stream, index)
        with self.cupy.cuda.Device(index), stream:
            kernel(launch.grid, launch.block, launch.args)

    def num_sms(self, device: torch.device) -> int:
        return _num_sms(device_index(device))

    def is_device_tensor(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cuda"

    def kernel_address(self, tensor: torch.Tensor) -> int | None:
        """Device tensors by their address; pinned host memory by its mapped device address."""
        if tensor.device.type == "cuda":
            return tensor.data_ptr()
        if not tensor.is_pinned():
            return None
        try:
            attributes = self.cupy.cuda.runtime.pointerGetAttributes(tensor.data_ptr())
        except Exception:  # noqa: BLE001 (pageable memory is reported as an error by some CUDA versions)
            return None
        address = int(getattr(attributes, "devicePointer", 0) or 0)
        return address or None

    def upload(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        return host.pin_memory().to(device, non_blocking=True)

    def synchronize(self, device: torch.device) -> None:
        torch.cuda.current_stream(device).synchronize()
