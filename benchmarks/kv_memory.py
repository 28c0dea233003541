"""KV memory efficiency: slots allocated vs tokens stored over a run, and sequences that fit a fixed pool."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.engine_probe import StepSample


@dataclass(frozen=True, slots=True)
class KVWaste:
    """Summed over steps: every step counts the slots held and the tokens stored after it.

    `max_partial_blocks_per_sequence` is the worst step's unused slots per running sequence, in blocks:
    below 1 means no sequence ever held more than one partly filled block.
    """

    num_steps: int
    allocated_slot_steps: int
    stored_token_steps: int
    peak_allocated_slots: int
    peak_stored_tokens: int
    max_partial_blocks_per_sequence: float

    @property
    def waste_fraction(self) -> float:
        if self.allocated_slot_steps == 0:
            return 0.0
        return 1.0 - self.stored_token_steps / self.allocated_slot_steps


def kv_waste(samples: Sequence[StepSample], block_size: int) -> KVWaste:
    """Steps with no running sequence (the last one only tells the executor what ended) are skipped."""
    live = [s for s in samples if s.num_running > 0]
    for s in live:
        assert s.num_stored_tokens <= s.num_allocated_slots, "more tokens stored than slots held"
    return KVWaste(
        num_steps=len(live),
        allocated_slot_steps=sum(s.num_allocated_slots for s in live),
        stored_token_steps=sum(s.num_stored_tokens for s in live),
        peak_allocated_slots=max((s.num_allocated_slots for s in live), default=0),
        peak_stored_tokens=max((s.num_stored_tokens for s in live), default=0),
        max_partial_blocks_per_sequence=max(
            ((s.num_allocated_slots - s.num_stored_tokens) / (s.num_running * block_size) for s in live),
            default=0.0,
        ),
    )


def paged_capacity(sequence_lens: Sequence[int], num_blocks: int, block_size: int) -> int:
    """How many of the workload's sequences, at their full length, are held at once by `num_blocks` blocks.

    Sequences are taken in workload order, cycling, until the next one no longer fits; each holds
    ceil(len / block_size) blocks.
    """
    if not sequence_lens or min(sequence_lens) < 1:
        raise ValueError("sequence lengths must be a non-empty list of positive lengths")
    num_free = num_blocks
    count = 0
    while True:
        needed = -(-sequence_lens[count % len(sequence_lens)] // block_size)
        if needed > num_free:
            return count
        num_free -= needed
        count += 1


def contiguous_capacity(num_slots: int, max_model_len: int) -> int:
    """Sequences held when each pre-allocates `max_model_len` contiguous slots, whatever it will use."""
    if max_model_len < 1:
        raise ValueError(f"max_model_len must be positive, got {max_model_len}")
    return num_slots // max_model_len
