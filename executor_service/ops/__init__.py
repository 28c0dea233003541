"""Kernel-level operations behind one interface: a torch reference backend and a CUDA (CuPy) backend."""

from executor_service.ops.base import OpsBackend


def create_ops_backend(name: str, device: str) -> OpsBackend:
    """Returns the backend called `name` ("auto", "torch" or "cuda") for `device`.

    "auto" picks "cuda" on a CUDA device when the CUDA backend is available, else "torch".
    """
    from executor_service.ops.torch_ops import TorchOps

    if name not in ("auto", "torch", "cuda"):
        raise ValueError(f"unknown ops backend {name!r}: choose auto, torch or cuda")
    if name == "cuda" or (name == "auto" and device.startswith("cuda")):
        from executor_service.ops.cuda_ops import CudaOps

        try:
            return CudaOps()
        except ImportError as error:
            if name == "cuda":
                raise ValueError(f"the cuda ops backend is not available: {error}") from error
    return TorchOps()


__all__ = ["OpsBackend", "create_ops_backend"]
