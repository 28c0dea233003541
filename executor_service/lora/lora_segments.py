"""Groups one step's batch rows into SGMV segments by the LoRA slot of the sequence they belong to."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from executor_service.ops.sgmv_segments import SgmvSegments


def build_lora_segments(
    lora_slots: Sequence[int | None], query_lens: Sequence[int], device: torch.device | str
) -> SgmvSegments | None:
    """Segments for sequences laid out one after another, sequence i owning `query_lens[i]` rows.

    A segment is a maximal run of consecutive rows with the same slot; base-model rows (slot None)
    between adapter rows form a slot -1 segment, and those before the first or after the last adapter
    row are in no segment. None when no sequence uses an adapter, so such a step does no LoRA work.
    """
    runs: list[list[int]] = []  # [start, end, slot]
    row = 0
    for slot, num_rows in zip(lora_slots, query_lens, strict=True):
        slot_id = -1 if slot is None else slot
        if num_rows > 0:
            if runs and runs[-1][2] == slot_id:
                runs[-1][1] = row + num_rows
            else:
                runs.append([row, row + num_rows, slot_id])
        row += num_rows
    while runs and runs[0][2] < 0:
        runs.pop(0)
    while runs and runs[-1][2] < 0:
        runs.pop()
    if not runs:
        return None
    return SgmvSegments.build([r[0] for r in runs] + [runs[-1][1]], [r[2] for r in runs], device)
