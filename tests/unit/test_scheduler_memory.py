"""The scheduler with the prefix cache and swap preemption, against a mirror of the executor's KV slots."""

from __future__ import annotations

import random
from collections import deque

import pytest
from structlog.testing import capture_logs

from scheduler_service.preemption_policy import TransferSpeeds
from scheduler_service.scheduler import Scheduler
from scheduler_service.sequence import Sequence, SequenceStatus
from shared.step_plan import BlockPairs, ContinuedSequence, NewSequence, SequenceOutput, StepPlan
from tests.helpers.executor_mirror import (
    GREEDY,
    ExecutorMirror,
    make_scheduler,
    make_seq,
    own_prompt,
    sampled_token,
    step,
)
from tests.helpers.random_aborts import maybe_abort_one

SHARED = (7, 7, 8, 8, 9, 9, 6, 6)
# Swap of one 1 kB block: 1 ms out + 1 ms in; recompute: 1 ms per token.
CHEAP_SWAP = TransferSpeeds(1000, 1e6, 1e6, 1e3)
DEAR_SWAP = TransferSpeeds(1000, 1e3, 1e3, 1e6)


def ref_counts(scheduler: Scheduler) -> list[int]:
    return [block.ref_count for block in scheduler.kv_cache_manager.block_pool.blocks]


def test_admission_reuses_a_cached_prefix_and_computes_only_the_rest() -> None:
    scheduler = make_scheduler()
    executor = ExecutorMirror(4, 16)
    first, second = make_seq(1, SHARED + (1, 2)), make_seq(2, SHARED + (3, 4, 5))
    scheduler.add_sequence(first)
    plan, _ = step(scheduler, executor)
    assert plan.new_sequences == (NewSequence(1, first.prompt_token_ids, 10, 0, (0, 1, 2), 10, GREEDY, None),)
    scheduler.add_sequence(second)
    plan, outputs = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=2,
        new_sequences=(NewSequence(2, second.prompt_token_ids, 11, 8, (0, 1, 3), 3, GREEDY, None),),
        continued_sequences=(ContinuedSequence(1, 1, ()),),
    )
    assert outputs == [SequenceOutput(2, (2011,)), SequenceOutput(1, (1011,))]
    assert ref_counts(scheduler)[:5] == [2, 2, 1, 1, 0]
    assert (first.num_cached_prompt_tokens, second.num_cached_prompt_tokens) == (0, 8)
    counters = scheduler.counters
    assert (counters.num_prompt_tokens_computed, counters.num_prompt_tokens_cached) == (13, 8)
    assert scheduler.kv_cache_manager.block_pool.cached_block_ids() == [0, 1]


def test_a_sequence_admitted_in_the_same_step_reuses_blocks_computed_in_that_step() -> None:
    scheduler = make_scheduler()
    executor = ExecutorMirror(4, 16)
    scheduler.add_sequence(make_seq(1, SHARED + (1, 2)))
    scheduler.add_sequence(make_seq(2, SHARED + (3, 4, 5)))
    plan, outputs = step(scheduler, executor)
    assert [(s.sequence_id, s.num_computed_tokens, s.block_ids) for s in plan.new_sequences] == [
        (1, 0, (0, 1, 2)),
        (2, 8, (0, 1, 3)),
    ]
    assert outputs == [SequenceOutput(1, (1010,)), SequenceOutput(2, (2011,))]


def test_different_salts_share_nothing() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=32)
    executor = ExecutorMirror(4, 16)
    scheduler.add_sequence(make_seq(1, SHARED + (1,), cache_salt="tenant-a"))
    scheduler.add_sequence(make_seq(2, SHARED + (1,), cache_salt="tenant-b"))
    scheduler.add_sequence(make_seq(3, SHARED + (1,), cache_salt="tenant-a"))
    plan, _ = step(scheduler, executor)
    assert [(s.num_computed_tokens, s.block_ids) for s in plan.new_sequences] == [
        (0, (0, 1, 2)),
        (0, (3, 4, 5)),
        (8, (0, 1, 6)),
    ]


def test_with_prefix_caching_off_nothing_is_shared() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=32, enable_prefix_caching=False)
    executor = ExecutorMirror(4, 16)
    scheduler.add_sequence(make_seq(1, SHARED + (1,)))
    scheduler.add_sequence(make_seq(2, SHARED + (1,)))
    plan, _ = step(scheduler, executor)
    assert [(s.num_computed_tokens, s.block_ids) for s in plan.new_sequences] == [
        (0, (0, 1, 2)),
        (0, (3, 4, 5)),
    ]
    assert scheduler.kv_cache_manager.block_pool.num_cached_blocks == 0


def two_decoders(**overrides: object) -> tuple[Scheduler, ExecutorMirror, Sequence, Sequence]:
    """Two 3-token prompts in 4 blocks of 2: at step 3 the first needs a block and the second yields."""
    settings: dict[str, object] = dict(
        num_blocks=4, block_size=2, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=8
    )
    settings.update(overrides)
    scheduler = make_scheduler(**settings)
    executor = ExecutorMirror(2, 4, int(settings.get("num_host_blocks", 0)))
    first, second = make_seq(1, own_prompt(1, 3)), make_seq(2, own_prompt(2, 3))
    scheduler.add_sequence(first)
    scheduler.add_sequence(second)
    step(scheduler, executor)
    step(scheduler, executor)
    return scheduler, executor, first, second


def finish_first_then_resume(
    scheduler: Scheduler, executor: ExecutorMirror, first: Sequence, num_outputs: int = 5
) -> StepPlan:
    while first.num_output_tokens < num_outputs:
        step(scheduler, executor)
    scheduler.finish_sequence(first.sequence_id)
    plan, _ = step(scheduler, executor)
    return plan


def test_recompute_reuses_the_victims_own_cached_blocks() -> None:
    scheduler, executor, first, second = two_decoders()
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=3, continued_sequences=(ContinuedSequence(1, 1, (3,)),), preempted_sequence_ids=(2,)
    )
    # The second's tail block 3 was evicted for the first; its head block 2 is still cached.
    assert sorted(scheduler.kv_cache_manager.block_pool.cached_block_ids()) == [0, 1, 2]
    assert second.recompute_until == 4

    # Finished before it needs a fourth block, the first leaves block 2 cached; blocks 3 and 1 come next.
    plan = finish_first_then_resume(scheduler, executor, first, num_outputs=3)
    assert plan.new_sequences == (
        NewSequence(2, (200, 201, 202, 2003, 2004), 3, 2, (2, 3, 1), 3, GREEDY, None),
    )
    assert second.output_token_ids == [2003, 2004, 2005]
    counters = scheduler.counters
    assert (counters.num_preemptions_recompute, counters.num_preemptions_swap) == (1, 0)
    assert counters.num_tokens_recomputed == 2
    assert (counters.num_prompt_tokens_computed, counters.num_prompt_tokens_cached) == (7, 2)
    assert second.num_cached_prompt_tokens == 0


def test_swap_out_keeps_the_computed_tokens_and_swap_in_brings_them_back() -> None:
    scheduler, executor, first, second = two_decoders(
        num_host_blocks=4, preemption_mode="swap", enable_prefix_caching=False
    )
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=3,
        continued_sequences=(ContinuedSequence(1, 1, (3,)),),
        preempted_sequence_ids=(2,),
        swap_out=BlockPairs((2, 3), (0, 1)),
    )
    assert second.status is SequenceStatus.SWAPPED and second.num_computed_tokens == 4
    assert scheduler.swap_space.block_ids(second.sequence_id) == (0, 1)
    assert scheduler.num_swapped == 1 and list(scheduler.waiting) == [second]

    plan = finish_first_then_resume(scheduler, executor, first)
    assert plan == StepPlan(
        step_id=6,
        new_sequences=(NewSequence(2, (200, 201, 202, 2003, 2004), 3, 4, (2, 3, 1), 1, GREEDY, None),),
        finished_sequence_ids=(1,),
        swap_in=BlockPairs((0, 1), (2, 3)),
    )
    assert second.output_token_ids == [2003, 2004, 2005]
    assert scheduler.swap_space.num_free_blocks == 4 and scheduler.num_swapped == 0
    counters = scheduler.counters
    assert counters.num_preemptions_swap == 1
    assert (counters.num_blocks_swapped_out, counters.num_blocks_swapped_in) == (2, 2)
    assert counters.num_tokens_recomputed == 0 and counters.num_prompt_tokens_computed == 6


def test_a_swap_resume_computes_the_last_token_again_when_its_sample_was_dropped_in_flight() -> None:
    scheduler = make_scheduler(
        num_blocks=4, block_size=2, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=8,
        num_host_blocks=4, preemption_mode="swap",
    )
    executor = ExecutorMirror(2, 4, 4)
    first, second = make_seq(1, own_prompt(1, 3)), make_seq(2, own_prompt(2, 3))
    scheduler.add_sequence(first)
    step(scheduler, executor)
    scheduler.add_sequence(second)
    plan_a = scheduler.schedule()
    assert plan_a is not None
    assert plan_a.continued_sequences == (ContinuedSequence(1, 1, ()),)
    assert plan_a.new_sequences[0].block_ids == (2, 3)
    assert (first.num_output_placeholders, second.num_output_placeholders) == (1, 1)
    # Both decode their tokens still in flight; the first's needs a third block, so the second (with
    # its sampled token in flight) is swapped out: the K/V plan a writes is copied after plan a ran.
    plan_b = scheduler.schedule()
    assert plan_b == StepPlan(
        step_id=3,
        continued_sequences=(ContinuedSequence(1, 1, (3,)),),
        preempted_sequence_ids=(2,),
        swap_out=BlockPairs((2, 3), (0, 1)),
    )
    assert second.num_computed_tokens == 3 and second.num_output_placeholders == 0
    scheduler.check_integrity()
    assert scheduler.apply_result(executor.step(plan_a)) == [SequenceOutput(1, (1004,))]
    assert scheduler.apply_result(executor.step(plan_b)) == [SequenceOutput(1, (1005,))]
    assert second.output_token_ids == [] and second.num_computed_tokens == 3
    scheduler.check_integrity()

    plan = finish_first_then_resume(scheduler, executor, first)
    assert plan.new_sequences == (NewSequence(2, (200, 201, 202), 3, 2, (2, 3), 1, GREEDY, None),)
    assert plan.swap_in == BlockPairs((0, 1), (2, 3))
    assert second.output_token_ids == [2003]


def test_cancelling_a_swapped_out_sequence_frees_its_host_blocks_and_tells_the_executor_nothing() -> None:
    scheduler, executor, first, second = two_decoders(num_host_blocks=4, preemption_mode="swap")
    step(scheduler, executor)
    assert scheduler.swap_space.num_free_blocks == 2
    assert scheduler.abort_sequence(second.sequence_id)
    scheduler.check_integrity()
    assert scheduler.swap_space.num_free_blocks == 4 and scheduler.num_waiting == 0
    scheduler.finish_sequence(first.sequence_id)
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(step_id=4, finished_sequence_ids=(1,))
    assert scheduler.kv_cache_manager.num_free_blocks == 4 and not scheduler.has_work


def test_a_full_host_pool_falls_back_to_recompute() -> None:
    scheduler, executor, first, second = two_decoders(num_host_blocks=1, preemption_mode="swap")
    with capture_logs() as logs:
        plan, _ = step(scheduler, executor)
    assert plan.swap_out == BlockPairs() and plan.preempted_sequence_ids == (2,)
    assert second.status is SequenceStatus.WAITING and second.num_computed_tokens == 0
    assert [(entry["mode"], entry["reason"]) for entry in logs if entry["event"] == "sequence_preempted"] == [
        ("recompute", "host pool full (1 free, 2 needed)")
    ]


@pytest.mark.parametrize(("speeds", "mode"), [(CHEAP_SWAP, "swap"), (DEAR_SWAP, "recompute")])
def test_auto_chooses_by_estimated_cost_and_logs_both_estimates(speeds: TransferSpeeds, mode: str) -> None:
    scheduler, executor, first, second = two_decoders(
        num_host_blocks=4, preemption_mode="auto", transfer_speeds=speeds
    )
    with capture_logs() as logs:
        step(scheduler, executor)
    (entry,) = [entry for entry in logs if entry["event"] == "sequence_preempted"]
    # 2 blocks of 1 kB out and in; 5 known tokens to compute again (nothing of them shared).
    assert entry["swap_seconds"] == pytest.approx(4000 / speeds.swap_out_bytes_per_second)
    assert entry["recompute_seconds"] == pytest.approx(5 / speeds.prefill_tokens_per_second)
    assert (entry["sequence_id"], entry["mode"], entry["num_blocks"], entry["num_tokens_to_recompute"]) == (
        2, mode, 2, 5
    )
    assert second.status is (SequenceStatus.SWAPPED if mode == "swap" else SequenceStatus.WAITING)
    finish_first_then_resume(scheduler, executor, first)
    assert second.output_token_ids == [2003, 2004, 2005]


def test_recompute_is_estimated_without_the_prefix_other_sequences_hold() -> None:
    scheduler = make_scheduler(
        num_blocks=6, block_size=2, max_num_batched_tokens=12, max_num_seqs=2, max_model_len=12,
        num_host_blocks=8, preemption_mode="auto", transfer_speeds=CHEAP_SWAP,
    )
    executor = ExecutorMirror(2, 6, 8)
    scheduler.add_sequence(make_seq(1, (5, 5, 6, 6, 1)))
    scheduler.add_sequence(make_seq(2, (5, 5, 6, 6, 2)))
    step(scheduler, executor)
    assert ref_counts(scheduler) == [2, 2, 1, 1, 0, 0]
    with capture_logs() as logs:
        while scheduler.num_preemptions == 0:
            step(scheduler, executor)
    (entry,) = [entry for entry in logs if entry["event"] == "sequence_preempted"]
    # The second has 9 known tokens (8 computed); the first 4 sit in blocks the first also holds.
    assert (entry["num_tokens_to_recompute"], entry["num_blocks"]) == (5, 4)


def test_a_lost_executor_turns_swapped_sequences_into_recomputes_and_empties_the_prefix_cache() -> None:
    scheduler, executor, first, second = two_decoders(num_host_blocks=4, preemption_mode="swap")
    step(scheduler, executor)
    assert second.status is SequenceStatus.SWAPPED
    scheduler.reset_executor_state()
    scheduler.check_integrity()
    assert [seq.sequence_id for seq in scheduler.waiting] == [1, 2]
    assert all(seq.status is SequenceStatus.WAITING for seq in scheduler.waiting)
    assert scheduler.swap_space.num_free_blocks == 4
    assert scheduler.kv_cache_manager.block_pool.num_cached_blocks == 0
    assert second.recompute_until == 4

    executor = ExecutorMirror(2, 4, 4)
    plan, _ = step(scheduler, executor)
    assert [(s.sequence_id, s.num_computed_tokens, s.num_scheduled_tokens) for s in plan.new_sequences] == [
        (1, 0, 6),
        (2, 0, 2),
    ]
    while first.num_output_tokens < 5:
        step(scheduler, executor)
    scheduler.finish_sequence(first.sequence_id)
    while second.num_output_tokens < 3:
        step(scheduler, executor)
    assert first.output_token_ids == [1003, 1004, 1005, 1006, 1007]
    assert second.output_token_ids == [2003, 2004, 2005]


def run_workload(
    seed: int, preemption_mode: str, enable_prefix_caching: bool, max_in_flight: int
) -> Scheduler:
    """Random arrivals sharing prefixes, random aborts, one or two plans in flight, until all end."""
    rng = random.Random(seed)
    speeds = CHEAP_SWAP if seed % 2 else DEAR_SWAP
    scheduler = make_scheduler(
        num_blocks=10, block_size=4, max_num_batched_tokens=12, max_num_seqs=4, max_model_len=40,
        num_host_blocks=12, preemption_mode=preemption_mode, transfer_speeds=speeds,
        enable_prefix_caching=enable_prefix_caching,
    )
    executor = ExecutorMirror(4, 10, 12)
    prefixes = [tuple(rng.randrange(50) for _ in range(12)) for _ in range(2)]
    max_tokens: dict[int, int] = {}
    pending = list(range(1, 17))
    live: dict[int, Sequence] = {}
    aborted: set[int] = set()
    in_flight: deque[StepPlan] = deque()
    for _ in range(2000):
        if pending and rng.random() < 0.4:
            sequence_id = pending.pop(0)
            prefix = rng.choice(prefixes)[: rng.randint(0, 12)]
            prompt = prefix + tuple(rng.randrange(50) for _ in range(rng.randint(1, 8)))
            seq = make_seq(sequence_id, prompt)
            max_tokens[sequence_id] = rng.randint(1, 40 - len(prompt))
            if sequence_id % 2:
                seq.max_num_tokens = len(prompt) + max_tokens[sequence_id]
            scheduler.add_sequence(seq)
            live[sequence_id] = seq
        maybe_abort_one(scheduler, rng, aborted)
        while len(in_flight) < max_in_flight:
            plan = scheduler.schedule()
            scheduler.check_integrity()
            if plan is None:
                break
            in_flight.append(plan)
        if not in_flight:
            if not pending and not scheduler.has_work:
                break
            continue
        for output in scheduler.apply_result(executor.step(in_flight.popleft())):
            seq = live[output.sequence_id]
            if seq.num_output_tokens == max_tokens[output.sequence_id]:
                scheduler.finish_sequence(seq.sequence_id)
        scheduler.check_integrity()
    assert not pending and not scheduler.has_work and not in_flight
    for sequence_id, seq in live.items():
        assert seq.status is SequenceStatus.FINISHED
        expected = [
            sampled_token(sequence_id, seq.num_prompt_tokens + i) for i in range(seq.num_output_tokens)
        ]
        assert seq.output_token_ids == expected
        if sequence_id not in aborted:
            assert seq.num_output_tokens == max_tokens[sequence_id]
    assert scheduler.kv_cache_manager.num_free_blocks == 10
    assert scheduler.swap_space.num_free_blocks == 12
    assert executor.token_ids == {}
    return scheduler


@pytest.mark.parametrize("max_in_flight", [1, 2])
@pytest.mark.parametrize("preemption_mode", ["recompute", "swap", "auto"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_shared_prefix_workload_under_pressure_ends_with_every_block_free(
    seed: int, preemption_mode: str, max_in_flight: int
) -> None:
    scheduler = run_workload(seed, preemption_mode, enable_prefix_caching=True, max_in_flight=max_in_flight)
    counters = scheduler.counters
    assert counters.num_preemptions > 0
    assert counters.num_prompt_tokens_cached > 0
    if preemption_mode == "recompute":
        assert counters.num_preemptions_swap == 0
    if preemption_mode == "swap":
        assert counters.num_preemptions_swap > 0


def test_random_workload_without_prefix_caching_caches_nothing() -> None:
    scheduler = run_workload(5, "swap", enable_prefix_caching=False, max_in_flight=2)
    assert scheduler.counters.num_prompt_tokens_cached == 0
    assert scheduler.counters.num_preemptions_swap > 0
