"""CuPy glue for the CUDA backend: import CuPy with a clear error, compile once, launch on torch's stream.

Kernels are compiled by CuPy's `RawModule` (NVRTC) the first time a (family, instantiation set) is
used on a device, once per process; CuPy's on-disk kernel cache (`CUPY_CACHE_DIR`, default
`~/.cupy/kernel_cache`) makes later processes skip NVRTC. Tensors are handed to kernels as raw device
pointers: torch and CuPy share the CUDA context, so nothing is copied or converted.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

import numpy as np
import torch

from executor_service.ops.cuda_kernels import COMPILE_OPTIONS, KernelFamily


def import_cupy() -> ModuleType:
    """CuPy, or ImportError saying what to install when it is missing or sees no GPU."""
    try:
        import cupy  # noqa: PLC0415 (optional extra, imported only by the CUDA backend)
    except ImportError as error:
        raise ImportError(
            "the cuda ops backend needs CuPy: pip install 'pagewire[cuda]' (cupy-cuda13x for CUDA 13, "
            f"cupy-cuda12x for CUDA 12), or use --attention-backend torch ({error})"
        ) from error
    try:
        num_devices = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # noqa: BLE001 (CuPy raises its own runtime error type without a driver)
        raise ImportError(f"CuPy is installed but cannot reach a CUDA device: {error}") from error
    if num_devices == 0:
        raise ImportError("CuPy is installed but sees no CUDA device")
    return cupy


@functools.cache
def _module(family: KernelFamily, name_expressions: tuple[str, ...]) -> Any:
    cupy = import_cupy()
    return cupy.RawModule(
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


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def launch(
    family: KernelFamily,
    name_expressions: tuple[str, ...],
    name: str,
    device: torch.device,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    args: tuple[Any, ...],
) -> None:
    """Launches `name` (compiled together with `name_expressions`) on `device`'s current torch stream."""
    index = device_index(device)
    kernel = _kernel(family, name_expressions, name, index)
    stream = _external_stream(torch.cuda.current_stream(device).cuda_stream, index)
    cupy = import_cupy()
    with cupy.cuda.Device(index), stream:
        kernel(grid, block, args)


def pointer(tensor: torch.Tensor | None) -> np.uint64:
    """A kernel argument for `T*`: the tensor's data address (null for None)."""
    return np.uint64(0 if tensor is None else tensor.data_ptr())


def host_device_pointer(tensor: torch.Tensor) -> int | None:
    """The device-side address of a pinned host tensor's data, or None when the device cannot map it."""
    cupy = import_cupy()
    try:
        attributes = cupy.cuda.runtime.pointerGetAttributes(tensor.data_ptr())
    except Exception:  # noqa: BLE001 (pageable memory is reported as an error by some CUDA versions)
        return None
    address = int(getattr(attributes, "devicePointer", 0) or 0)
    return address or None


def num_sms(device: torch.device) -> int:
    return _num_sms(device_index(device))


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
