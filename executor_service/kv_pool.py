"""The physical paged KV cache: per-layer K and V blocks on the device and a swap pool in host memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from executor_service.ops.base import OpsBackend
from shared.step_plan import BlockPairs


@dataclass(frozen=True, slots=True)
class KVGeometry:
    """Shape of one block: `[block_size, num_kv_heads, head_dim]` per layer, for K and for V."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V together."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * element_size

    def num_blocks_in(self, num_bytes: int) -> int:
        return num_bytes // self.bytes_per_block


class KVPool:
    """Device blocks `[0, num_device_blocks)` and host blocks `[0, num_host_blocks)`.

    The pool owns memory, not meaning: which block belongs to which sequence is the scheduler's
    business. Block ops are synchronous: when a swap returns, the destination holds the data, so a
    block freed by the scheduler after its swap-out can be reused by the next plan.
    """

    def __init__(
        self,
        geometry: KVGeometry,
        num_device_blocks: int,
        num_host_blocks: int,
        device: torch.device,
        ops: OpsBackend,
    ) -> None:
        self.geometry = geometry
        self.num_device_blocks = num_device_blocks
        self.num_host_blocks = num_host_blocks
        self.device = device
        self.ops = ops
        shape = (geometry.block_size, geometry.num_kv_heads, geometry.head_dim)
        self.device_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.zeros((num_device_blocks, *shape), dtype=geometry.dtype, device=device),
                torch.zeros((num_device_blocks, *shape), dtype=geometry.dtype, device=device),
            )
            for _ in range(geometry.num_layers)
        ]
        # Pinned on CUDA so swaps are real DMA; untouched pages cost nothing until used.
        pin = device.type == "cuda"
        self.host_caches: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.empty((num_host_blocks, *shape), dtype=geometry.dtype, pin_memory=pin),
                torch.empty((num_host_blocks, *shape), dtype=geometry.dtype, pin_memory=pin),
            )
            for _ in range(geometry.num_layers)
        ]

    def _flat(self, caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [tensor for pair in caches for tensor in pair]

    def swap_out(self, pairs: BlockPairs) -> None:
        """Copies device blocks `src` to host blocks `dst`."""
        if len(pairs):
            self.ops.swap_blocks(
                self._flat(self.device_caches), self._flat(self.host_caches),
                list(pairs.src_block_ids), list(pairs.dst_block_ids),
            )

    def swap_in(self, pairs: BlockPairs) -> None:
        """Copies host blocks `src` to device blocks `dst`."""
        if len(pairs):
            self.ops.swap_blocks(
                self._flat(self.host_caches), self._flat(self.device_caches),
                list(pairs.src_block_ids), list(pairs.dst_block_ids),
            )

    def copy(self, pairs: BlockPairs) -> None:
        """Copies device blocks `src` to device blocks `dst`."""
        if len(pairs):
            self.ops.copy_blocks(
                self._flat(self.device_caches), list(pairs.src_block_ids), list(pairs.dst_block_ids)
            )
