"""One step's LoRA state: the slots and segments the forward adds each target module's delta with."""

from __future__ import annotations

import torch

from executor_service.lora.lora_slots import LoraSlots
from executor_service.ops.base import OpsBackend
from executor_service.ops.sgmv_segments import SgmvSegments


class LoraBatch:
    """Adds `x @ A_s^T @ (scaling_s B_s)^T` to the rows of each segment with slot s >= 0.

    Built per step only when some scheduled sequence uses an adapter; a module no slot of the step
    targets is skipped. One SGMV shrink and one expand per (layer, module), over the whole batch;
    rows outside adapter segments are never written.
    """

    def __init__(self, slots: LoraSlots, segments: SgmvSegments, ops: OpsBackend, num_tokens: int) -> None:
        self.slots = slots
        self.segments = segments
        self.ops = ops
        self.target_modules = slots.target_modules(s for s in segments.slot_ids_cpu if s >= 0)
        self._shrunk = torch.empty(num_tokens, slots.max_lora_rank, dtype=torch.float32, device=slots.device)

    def add_delta(self, layer_index: int, module: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """Adds module `module`'s LoRA delta of input `x` `[T, in]` to `out` `[T, out]` (may be a column
        slice of a fused projection's output), in place."""
        if module not in self.target_modules:
            return
        self.ops.sgmv_shrink(x, self.slots.lora_a[layer_index][module], self._shrunk, self.segments, 1.0)
        self.ops.sgmv_expand(self._shrunk, self.slots.lora_b[layer_index][module], out, self.segments)
