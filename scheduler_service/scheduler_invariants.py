"""The scheduler's invariants, checked after every step in tests (`Scheduler.check_integrity`).

A companion of `scheduler.py`: it reads the scheduler's private state on purpose, so the policy file
holds the decisions and this one what must hold between them (see the Scheduler docstring).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from scheduler_service.sequence import SequenceStatus

if TYPE_CHECKING:
    from scheduler_service.scheduler import Scheduler


def check_scheduler_invariants(scheduler: Scheduler) -> None:
    """Raises AssertionError naming the first invariant `scheduler` breaks."""
    kv = scheduler.kv_cache_manager
    kv.check_integrity()
    scheduler.swap_space.check_integrity()
    scheduler.plan_encoder.check_integrity()
    scheduler.lora_slots.check_integrity(seq.lora_slot for seq in scheduler.running if seq.lora_slot is not None)
    running_ids = [seq.sequence_id for seq in scheduler.running]
    waiting_ids = [seq.sequence_id for seq in scheduler.waiting]
    assert len(set(running_ids)) == len(running_ids), f"a sequence runs twice: {running_ids}"
    assert len(set(waiting_ids)) == len(waiting_ids), f"a sequence waits twice: {waiting_ids}"
    assert not set(running_ids) & set(waiting_ids), "a sequence is both waiting and running"
    assert set(running_ids) | set(waiting_ids) == set(scheduler._sequences), "live sequences out of sync"
    assert len(scheduler.running) <= scheduler.config.max_num_seqs
    for queue in (scheduler.running, scheduler.waiting):
        arrivals = [seq.arrival_index for seq in queue]
        assert arrivals == sorted(arrivals), f"queue out of arrival order: {arrivals}"
    num_tokens_in_flight = scheduler._in_flight.num_tokens_sampled()
    for seq in scheduler.running:
        assert seq.status is SequenceStatus.RUNNING
        assert (seq.adapter is None) == (seq.lora_slot is None), f"{seq.sequence_id}: adapter without slot"
        assert 0 < seq.num_computed_tokens <= seq.num_tokens_with_placeholders + seq.num_draft_tokens
        assert seq.num_output_placeholders == num_tokens_in_flight.get(seq.sequence_id, 0), (
            f"{seq.sequence_id}: {seq.num_output_placeholders} placeholders, "
            f"{num_tokens_in_flight.get(seq.sequence_id, 0)} tokens sampled in flight"
        )
        assert seq.num_output_placeholders == 0 or seq.num_computed_tokens >= seq.num_tokens
        assert seq.num_tokens_with_placeholders <= seq.num_tokens_limit(scheduler.config.max_model_len), (
            f"{seq.sequence_id} has a placeholder past its end"
        )
        num_table_tokens = len(kv.block_ids(seq.sequence_id)) * kv.block_size
        assert num_table_tokens >= seq.num_computed_tokens, f"table of {seq.sequence_id} is too short"
        num_sent = scheduler.plan_encoder.num_sent_block_ids(seq.sequence_id)
        assert num_sent == len(kv.block_ids(seq.sequence_id)), f"unsent blocks of {seq.sequence_id}"
    for seq in scheduler.running[:-1]:
        assert seq.num_uncomputed_tokens <= 1, f"{seq.sequence_id} is a partial prompt but not the latest"
    swapped_ids = set()
    for seq in scheduler.waiting:
        assert seq.num_output_placeholders == 0 and not seq.num_draft_tokens, f"waiting {seq.sequence_id} has placeholders"
        assert seq.lora_slot is None, f"waiting {seq.sequence_id} pins LoRA slot {seq.lora_slot}"
        if seq.status is SequenceStatus.SWAPPED:
            swapped_ids.add(seq.sequence_id)
            assert 0 < seq.num_computed_tokens <= seq.num_tokens
            num_host_blocks = len(scheduler.swap_space.block_ids(seq.sequence_id))
            assert num_host_blocks == -(-seq.num_computed_tokens // kv.block_size), (
                f"swapped {seq.sequence_id}: {num_host_blocks} host blocks for "
                f"{seq.num_computed_tokens} tokens"
            )
        else:
            assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0
    assert set(scheduler.swap_space.sequence_ids()) == swapped_ids, "a sequence not swapped holds host blocks"
    assert set(kv.sequence_ids()) <= set(running_ids), "a sequence that is not running holds blocks"
    assert scheduler.plan_encoder.known_sequence_ids() == set(running_ids) | set(scheduler._finished_ids_to_send)
    assert kv.num_free_blocks + kv.num_held_blocks() == kv.block_pool.num_blocks
