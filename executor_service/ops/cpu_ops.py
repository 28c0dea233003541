"""The CPU ops backend: torch's cache and block ops, with paged attention by a compiled C++ kernel."""

from __future__ import annotations

import torch

from executor_service.attention_metadata import AttentionMetadata
from executor_service.ops.cpu_kernel_build import load_cpu_kernels
from executor_service.ops.torch_ops import TorchOps


class CpuOps(TorchOps):
    """`TorchOps` whose float32 paged attention reads K/V in place through the block table.

    The kernel (executor_service/ops/cpu_kernel_source.py) computes every query row from its own
    visible context in a fixed order, so a row's output is bitwise independent of the batch it is in,
    of how its prompt was chunked and of the thread count; `TorchOps` is its test oracle (equal to
    float32 rounding, not bitwise). Other dtypes and devices use the torch path. Building the kernel
    needs a C++ compiler and ninja; the constructor raises `CpuKernelUnavailable` without them.
    """

    name = "cpu"

    def __init__(self) -> None:
        self._kernels = load_cpu_kernels()

    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if not (
            query.device.type == "cpu"
            and query.dtype == torch.float32
            and key_cache.dtype == torch.float32
            and value_cache.dtype == torch.float32
        ):
            return super().paged_attention(query, key_cache, value_cache, metadata, scale)
        return self._kernels.paged_attention(
            query.contiguous(),
            key_cache,
            value_cache,
            metadata.block_tables,
            metadata.context_lens,
            metadata.query_start_loc,
            scale,
        )
