"""Kernel-level operations behind one interface: a torch reference backend, a CPU backend with a
compiled C++ attention kernel, and a CUDA (CuPy) backend."""

import structlog

from executor_service.ops.base import OpsBackend


def create_ops_backend(name: str, device: str) -> OpsBackend:
    """Returns the backend called `name` ("auto", "torch", "cpu" or "cuda") for `device`.

    "auto" picks "cuda" on a CUDA device when the CUDA backend is available; on the CPU it picks "cpu"
    (the compiled, batch-invariant attention kernel) when it builds here, else "torch" with a warning.
    """
    from executor_service.ops.torch_ops import TorchOps

    if name not in ("auto", "torch", "cpu", "cuda"):
        raise ValueError(f"unknown ops backend {name!r}: choose auto, torch, cpu or cuda")
    if name == "cpu" or (name == "auto" and device == "cpu"):
        from executor_service.ops.cpu_kernel_build import CpuKernelUnavailable
        from executor_service.ops.cpu_ops import CpuOps

        try:
            return CpuOps()
        except CpuKernelUnavailable as error:
            if name == "cpu":
                raise ValueError(f"the cpu ops backend is not available: {error}") from error
            structlog.get_logger(__name__).warning(
                "cpu_kernel_unavailable", reason=str(error), fallback="torch (not batch-invariant)"
            )
            return TorchOps()
    if name == "cuda" or (name == "auto" and device.startswith("cuda")):
        from executor_service.ops.cuda_ops import CudaOps

        try:
            return CudaOps()
        except ImportError as error:
            if name == "cuda":
                raise ValueError(f"the cuda ops backend is not available: {error}") from error
    return TorchOps()


__all__ = ["OpsBackend", "create_ops_backend"]
