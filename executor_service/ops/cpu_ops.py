"""The CPU ops backend: torch's cache and block ops; paged attention, RMSNorm, rotary embedding and SGMV
by compiled C++ kernels."""

from __future__ import annotations

import structlog
import torch

from executor_service.attention_metadata import AttentionMetadata
from executor_service.ops import cpu_sgmv
from executor_service.ops.cpu_kernel_build import CpuKernelUnavailable, load_cpu_kernels
from executor_service.ops.sgmv_segments import SgmvSegments
from executor_service.ops.torch_ops import TorchOps

log = structlog.get_logger(__name__)


class CpuOps(TorchOps):
    """`TorchOps` whose float32 paged attention reads K/V in place through the block table.

    The kernel (executor_service/ops/cpu_kernel_source.py) computes every query row from its own
    visible context in a fixed order, so a row's output is bitwise independent of the batch it is in,
    of how its prompt was chunked and of the thread count; `TorchOps` is its test oracle (equal to
    float32 rounding, not bitwise). Other dtypes and devices use the torch path. Building the kernel
    needs a C++ compiler and ninja; the constructor raises `CpuKernelUnavailable` without them.

    RMSNorm and the rotary embedding (executor_service/ops/cpu_elementwise_source.py) read and write
    each row once instead of a pass per elementwise op, row by row in a fixed order (batch-invariant
    the same way); the rotary kernel rotates the query and key in place.

    SGMV shrink and expand (executor_service/ops/cpu_sgmv_source.py) are one kernel call per op over
    the whole mixed batch instead of two torch ops per segment, batch-invariant the same way; if that
    kernel alone fails to build, SGMV falls back to the torch reference. It is built by `prepare_lora`
    (or the first SGMV call), so an executor without LoRA never builds it.
    """

    name = "cpu"

    def __init__(self) -> None:
        self._kernels = load_cpu_kernels()
        self._sgmv: cpu_sgmv.CpuSgmv | None = None
        self._sgmv_tried = False

    def prepare_lora(self) -> None:
        if self._sgmv_tried:
            return
        self._sgmv_tried = True
        try:
            self._sgmv = cpu_sgmv.CpuSgmv(cpu_sgmv.load_cpu_sgmv_kernels())
        except CpuKernelUnavailable as error:
            log.warning("cpu_sgmv_kernel_unavailable", error=str(error))

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

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not (_is_cpu_float32(x, weight) and x.dim() == 2 and x.stride(1) == 1 and weight.is_contiguous()):
            return super().rms_norm(x, weight, eps)
        return self._kernels.rms_norm(x, weight, eps)

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dense = all(t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2] for t in (query, key))
        if not (_is_cpu_float32(query, key, cos, sin) and dense and positions.dtype == torch.int64):
            return super().rotary_embedding(positions, query, key, cos, sin)
        self._kernels.rotary_embedding(positions.contiguous(), query, key, cos, sin)
        return query, key

    def sgmv_shrink(
        self, x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, segments: SgmvSegments, scale: float
    ) -> None:
        self.prepare_lora()
        if self._sgmv is None or not cpu_sgmv.kernel_applies(x, lora_a, out, segments):
            super().sgmv_shrink(x, lora_a, out, segments, scale)
            return
        self._sgmv.shrink(x, lora_a, out, segments, scale)

    def sgmv_expand(
        self, v: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, segments: SgmvSegments
    ) -> None:
        self.prepare_lora()
        if self._sgmv is None or not cpu_sgmv.kernel_applies(v, lora_b, out, segments):
            super().sgmv_expand(v, lora_b, out, segments)
            return
        self._sgmv.expand(v, lora_b, out, segments)


def _is_cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
