"""The CPU SGMV kernels: built once per machine (cached on disk), behind a typed wrapper that checks first."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from executor_service.ops.cpu_kernel_build import build_cpu_extension
from executor_service.ops.cpu_sgmv_source import CPP_SOURCE
from executor_service.ops.sgmv_segments import SgmvSegments
from executor_service.ops.torch_sgmv import check_segments, check_sgmv_expand_shapes, check_sgmv_shrink_shapes


@functools.cache
def load_cpu_sgmv_kernels() -> ModuleType:
    """The compiled module with `sgmv_shrink` and `sgmv_expand`; raises CpuKernelUnavailable if it
    cannot build."""
    return build_cpu_extension("CPU SGMV kernel", "pagewire_cpu_sgmv", CPP_SOURCE, ["sgmv_shrink", "sgmv_expand"])


def kernel_applies(x: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, segments: SgmvSegments) -> bool:
    """Whether the kernel takes these arguments: float32 CPU tensors, contiguous slot weights, rows
    with unit column stride (any row stride) and segments on the host."""
    return (
        x.dtype == weights.dtype == out.dtype == torch.float32
        and x.is_cpu
        and weights.is_cpu
        and out.is_cpu
        and weights.is_contiguous()
        and x.stride(-1) == 1
        and out.stride(-1) == 1
        and segments.starts.is_cpu
        and segments.slot_ids.is_cpu
    )


class CpuSgmv:
    """`OpsBackend.sgmv_shrink` / `sgmv_expand` by the kernels, for arguments `kernel_applies` accepts.

    Shapes are checked on every call; a step's segments, the same object for all of its 2 x layers x
    modules calls, are checked against the batch once (the reference's `check_segments`).
    """

    def __init__(self, kernels: ModuleType) -> None:
        self.kernels = kernels
        self._checked: tuple[SgmvSegments, int, int] | None = None

    def _check_segments(self, segments: SgmvSegments, num_rows: int, num_slots: int) -> None:
        checked = self._checked
        if checked is not None and checked[0] is segments and checked[1:] == (num_rows, num_slots):
            return
        check_segments(segments, num_rows, num_slots)
        self._checked = (segments, num_rows, num_slots)

    def shrink(
        self, x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, segments: SgmvSegments, scale: float
    ) -> None:
        check_sgmv_shrink_shapes(x, lora_a, out)
        self._check_segments(segments, x.shape[0], lora_a.shape[0])
        self.kernels.sgmv_shrink(x, lora_a, out, segments.starts, segments.slot_ids, float(scale))

    def expand(
        self, v: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, segments: SgmvSegments
    ) -> None:
        check_sgmv_expand_shapes(v, lora_b, out)
        self._check_segments(segments, v.shape[0], lora_b.shape[0])
        self.kernels.sgmv_expand(v, lora_b, out, segments.starts, segments.slot_ids)
