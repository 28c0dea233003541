"""Turns the sequences scheduled in one step into the flattened varlen batch the model runs on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from executor_service.attention_metadata import AttentionMetadata
from executor_service.lora.lora_segments import build_lora_segments
from executor_service.ops.sgmv_segments import SgmvSegments
from executor_service.persistent_batch import ScheduledSequence


@dataclass(frozen=True, slots=True)
class ModelInput:
    """All scheduled tokens of all sequences concatenated, and which rows need logits."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    # Rows whose logits are sampled, in schedule order: per sampling sequence, its last row, or its
    # last 1 + k rows when it verifies k draft tokens.
    logits_indices: torch.Tensor  # [num_logits_rows] int64
    sampling_seq_indices: tuple[int, ...]
    # Rows by LoRA slot; None when no scheduled sequence uses an adapter.
    lora_segments: SgmvSegments | None = None


def build_model_input(scheduled: list[ScheduledSequence], block_size: int, device: torch.device) -> ModelInput:
    """Builds the step's tensors with vectorised host-side numpy, then one copy per tensor to `device`."""
    query_lens = np.fromiter((s.num_tokens for s in scheduled), dtype=np.int64, count=len(scheduled))
    starts = np.fromiter((s.start for s in scheduled), dtype=np.int64, count=len(scheduled))
    context_lens = starts + query_lens
    query_start_loc = np.zeros(len(scheduled) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])

    # Position of each token: its sequence's start plus its offset within the sequence's rows.
    seq_of_token = np.repeat(np.arange(len(scheduled)), query_lens)
    positions = starts[seq_of_token] + (np.arange(num_tokens) - query_start_loc[:-1][seq_of_token])

    max_blocks = max((len(s.state.block_ids) for s in scheduled), default=0)
    block_tables = np.zeros((len(scheduled), max(max_blocks, 1)), dtype=np.int64)
    for row, s in enumerate(scheduled):
        block_tables[row, : len(s.state.block_ids)] = s.state.block_ids
    slot_mapping = block_tables[seq_of_token, positions // block_size] * block_size + positions % block_size

    input_ids: list[int] = []
    for s in scheduled:
        input_ids.extend(s.input_token_ids)

    sampling_seq_indices = tuple(i for i, s in enumerate(scheduled) if s.samples)
    if any(s.draft_token_ids for s in scheduled):
        logits_indices = np.asarray([
            row
            for i in sampling_seq_indices
            for row in range(int(query_start_loc[i + 1]) - 1 - len(scheduled[i].draft_token_ids), int(query_start_loc[i + 1]))
        ], dtype=np.int64)
    else:
        logits_indices = query_start_loc[1:][list(sampling_seq_indices)] - 1

    def to_device(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(array).to(device=device, dtype=dtype, non_blocking=True)

    metadata = AttentionMetadata(
        slot_mapping=to_device(slot_mapping, torch.int64),
        query_start_loc=to_device(query_start_loc, torch.int32),
        context_lens=to_device(context_lens, torch.int32),
        block_tables=to_device(block_tables, torch.int32),
        block_size=block_size,
        query_lens_cpu=tuple(query_lens.tolist()),
        context_lens_cpu=tuple(context_lens.tolist()),
    )
    return ModelInput(
        input_ids=torch.tensor(input_ids, dtype=torch.int64).to(device, non_blocking=True),
        positions=to_device(positions, torch.int64),
        metadata=metadata,
        logits_indices=to_device(np.asarray(logits_indices, dtype=np.int64), torch.int64),
        sampling_seq_indices=sampling_seq_indices,
        lora_segments=build_lora_segments(
            [s.state.lora_slot for s in scheduled], metadata.query_lens_cpu, device
        ),
    )
