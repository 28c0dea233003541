"""Which adapter slot each run of batch rows uses, for the SGMV (multi-LoRA) ops."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SgmvSegments:
    """Segment i covers batch rows `[starts[i], starts[i + 1])` and uses adapter slot `slot_ids[i]`.

    Rows before `starts[0]` or from `starts[-1]` on belong to no segment. A negative slot id marks a
    segment whose rows use no adapter. Tensors live on the compute device; the `*_cpu` tuples are
    host copies (backends that loop over segments never synchronise with the device), and
    `max_segment_len` sizes the CUDA grid.
    """

    # [num_segments + 1] int32, non-decreasing.
    starts: torch.Tensor
    # [num_segments] int32; negative: no adapter.
    slot_ids: torch.Tensor
    starts_cpu: tuple[int, ...]
    slot_ids_cpu: tuple[int, ...]

    @classmethod
    def build(
        cls, starts: Sequence[int], slot_ids: Sequence[int], device: torch.device | str = "cpu"
    ) -> SgmvSegments:
        """Segments from host lists; raises ValueError unless `starts` has one more entry than
        `slot_ids`, begins at 0 or more and never decreases."""
        if len(starts) != len(slot_ids) + 1:
            raise ValueError(f"need len(starts) == len(slot_ids) + 1, got {len(starts)} and {len(slot_ids)}")
        if starts[0] < 0 or any(b < a for a, b in itertools.pairwise(starts)):
            raise ValueError(f"segment starts must be >= 0 and non-decreasing, got {list(starts)}")
        return cls(
            starts=torch.tensor(list(starts), dtype=torch.int32, device=device),
            slot_ids=torch.tensor(list(slot_ids), dtype=torch.int32, device=device),
            starts_cpu=tuple(starts),
            slot_ids_cpu=tuple(slot_ids),
        )

    @property
    def num_segments(self) -> int:
        return len(self.slot_ids_cpu)

    @property
    def max_segment_len(self) -> int:
        return max((b - a for a, b in zip(self.starts_cpu, self.starts_cpu[1:], strict=False)), default=0)

    def rows(self, index: int) -> slice:
        return slice(self.starts_cpu[index], self.starts_cpu[index + 1])
