"""Turns one step's scheduling decision into a delta-encoded StepPlan against what the executor holds."""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Sequence as SequenceOf

from scheduler_service.sequence import Sequence
from shared.step_plan import (
    AdapterLoad,
    BlockId,
    BlockPairs,
    ContinuedSequence,
    NewSequence,
    SequenceId,
    StepPlan,
)


class PlanEncoder:
    """Mirrors the executor's persistent batch: which sequences it holds and how many of each one's
    block ids it was sent.

    A sequence the executor does not hold goes out in full as a NewSequence (every known token, its
    computed-token count and whole block table); one it holds goes out as a ContinuedSequence carrying
    only the block ids appended since. Finished and preempted ids make the executor, and this encoder,
    forget a sequence. Step ids increase strictly from 1 and keep increasing across `reset`.
    """

    def __init__(self) -> None:
        self._last_step_id = 0
        self._num_sent_block_ids: dict[SequenceId, int] = {}

    def knows(self, sequence_id: SequenceId) -> bool:
        """Whether the executor holds the sequence (it was sent and not since finished or preempted)."""
        return sequence_id in self._num_sent_block_ids

    def known_sequence_ids(self) -> set[SequenceId]:
        return set(self._num_sent_block_ids)

    def num_sent_block_ids(self, sequence_id: SequenceId) -> int | None:
        """How many of the sequence's block ids the executor holds; None when it does not hold it."""
        return self._num_sent_block_ids.get(sequence_id)

    def encode(
        self,
        scheduled: Iterable[tuple[Sequence, int, SequenceOf[BlockId]]],
        finished_sequence_ids: SequenceOf[SequenceId] = (),
        preempted_sequence_ids: SequenceOf[SequenceId] = (),
        swap_out: BlockPairs = BlockPairs(),
        swap_in: BlockPairs = BlockPairs(),
        adapter_loads: tuple[AdapterLoad, ...] = (),
    ) -> StepPlan:
        """Build the next plan from (sequence, tokens to compute this step, full block table) triples.

        Each sequence's `num_computed_tokens` must still be the count before this step. Finished and
        preempted ids must be held by the executor; they are dropped before the scheduled sequences
        are encoded, matching the executor's execution order, so a preempted id may come back as new
        in the same plan. `swap_out` (device -> host) and `swap_in` (host -> device) block pairs go out
        as given; the executor runs them, in that order, before the forward, then `adapter_loads`.
        """
        for sequence_id in (*finished_sequence_ids, *preempted_sequence_ids):
            assert sequence_id in self._num_sent_block_ids, f"executor does not hold sequence {sequence_id}"
            del self._num_sent_block_ids[sequence_id]
        new_sequences: list[NewSequence] = []
        continued_sequences: list[ContinuedSequence] = []
        encoded: set[SequenceId] = set()
        for seq, num_scheduled_tokens, block_ids in scheduled:
            assert num_scheduled_tokens > 0, f"sequence {seq.sequence_id} scheduled with no tokens"
            assert seq.sequence_id not in encoded, f"sequence {seq.sequence_id} scheduled twice"
            encoded.add(seq.sequence_id)
            num_sent = self._num_sent_block_ids.get(seq.sequence_id)
            if num_sent is None:
                new_sequences.append(
                    NewSequence(
                        sequence_id=seq.sequence_id,
                        token_ids=seq.token_ids,
                        num_prompt_tokens=seq.num_prompt_tokens,
                        num_computed_tokens=seq.num_computed_tokens,
                        block_ids=tuple(block_ids),
                        num_scheduled_tokens=num_scheduled_tokens,
                        sampling=seq.sampling,
                        lora_slot=seq.lora_slot,
                    )
                )
            else:
                assert len(block_ids) >= num_sent, f"block table of sequence {seq.sequence_id} shrank"
                continued_sequences.append(
                    ContinuedSequence(
                        seq.sequence_id, num_scheduled_tokens, tuple(block_ids[num_sent:]), seq.draft_token_ids,
                        seq.num_model_drafts,
                    )
                )
            self._num_sent_block_ids[seq.sequence_id] = len(block_ids)
        self._last_step_id += 1
        return StepPlan(
            step_id=self._last_step_id,
            new_sequences=tuple(new_sequences),
            continued_sequences=tuple(continued_sequences),
            finished_sequence_ids=tuple(finished_sequence_ids),
            preempted_sequence_ids=tuple(preempted_sequence_ids),
            swap_out=swap_out,
            swap_in=swap_in,
            adapter_loads=adapter_loads,
        )

    def reset(self) -> None:
        """Forget every sequence: the stream to the executor was replaced and the new one holds nothing."""
        self._num_sent_block_ids.clear()

    def check_integrity(self) -> None:
        assert self._last_step_id >= 0
        for sequence_id, num_sent in self._num_sent_block_ids.items():
            assert num_sent >= 0, f"sequence {sequence_id} has {num_sent} sent block ids"
