"""Overlap scheduling: plans scheduled before the previous result arrives, with output placeholders."""

from __future__ import annotations

from scheduler_service.scheduler import Scheduler
from shared.step_plan import ContinuedSequence, NewSequence, SequenceOutput, StepPlan
from tests.helpers.executor_mirror import GREEDY, ExecutorMirror, make_scheduler, make_seq, own_prompt


def schedule(scheduler: Scheduler, expected_in_flight: int) -> StepPlan:
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.check_integrity()
    assert scheduler.num_in_flight == expected_in_flight
    return plan


def apply(scheduler: Scheduler, executor: ExecutorMirror, plan: StepPlan) -> list[SequenceOutput]:
    outputs = scheduler.apply_result(executor.step(plan))
    scheduler.check_integrity()
    return outputs


def test_the_second_plan_decodes_placeholders_and_takes_a_block_only_at_a_boundary() -> None:
    scheduler = make_scheduler(enable_prefix_caching=False)
    executor = ExecutorMirror(4, 16)
    short, long = make_seq(1, own_prompt(1, 2)), make_seq(2, own_prompt(2, 5))
    scheduler.add_sequence(short)
    scheduler.add_sequence(long)
    first = schedule(scheduler, 1)
    assert first.new_sequences == (
        NewSequence(1, (100, 101), 2, 0, (0,), 2, GREEDY, None),
        NewSequence(2, (200, 201, 202, 203, 204), 5, 0, (1, 2), 5, GREEDY, None),
    )
    second = schedule(scheduler, 2)
    assert second == StepPlan(
        step_id=2, continued_sequences=(ContinuedSequence(1, 1, ()), ContinuedSequence(2, 1, ()))
    )
    assert (short.num_tokens, short.num_output_placeholders, short.num_computed_tokens) == (2, 2, 3)
    assert (long.num_tokens, long.num_output_placeholders, long.num_computed_tokens) == (5, 2, 6)

    assert apply(scheduler, executor, first) == [SequenceOutput(1, (1002,)), SequenceOutput(2, (2005,))]
    assert (short.num_output_placeholders, long.num_output_placeholders) == (1, 1)
    third = schedule(scheduler, 2)
    assert third == StepPlan(
        step_id=3, continued_sequences=(ContinuedSequence(1, 1, ()), ContinuedSequence(2, 1, ()))
    )
    assert apply(scheduler, executor, second) == [SequenceOutput(1, (1003,)), SequenceOutput(2, (2006,))]
    # The short one's next placeholder sits at position 4: its first block is full, it takes block 3.
    fourth = schedule(scheduler, 2)
    assert fourth == StepPlan(
        step_id=4, continued_sequences=(ContinuedSequence(1, 1, (3,)), ContinuedSequence(2, 1, ()))
    )
    assert apply(scheduler, executor, third) == [SequenceOutput(1, (1004,)), SequenceOutput(2, (2007,))]
    assert apply(scheduler, executor, fourth) == [SequenceOutput(1, (1005,)), SequenceOutput(2, (2008,))]
    assert short.output_token_ids == [1002, 1003, 1004, 1005]
    assert scheduler.num_in_flight == 0 and short.num_output_placeholders == 0


def test_a_stop_found_one_step_late_costs_one_dropped_output_and_frees_everything() -> None:
    scheduler = make_scheduler(num_blocks=2, max_model_len=8, enable_prefix_caching=False)
    executor = ExecutorMirror(4, 2)
    stopping = make_seq(1, own_prompt(1, 3))
    scheduler.add_sequence(stopping)
    first = schedule(scheduler, 1)
    second = schedule(scheduler, 2)
    assert second.continued_sequences == (ContinuedSequence(1, 1, ()),)
    assert apply(scheduler, executor, first) == [SequenceOutput(1, (1003,))]
    # The engine finds a stop token in 1003; the step computing it is already in flight.
    scheduler.finish_sequence(stopping.sequence_id)
    scheduler.check_integrity()
    assert scheduler.kv_cache_manager.num_free_blocks == 2 and scheduler.num_in_flight == 1
    latecomer = make_seq(2, own_prompt(2, 5))
    scheduler.add_sequence(latecomer)
    third = schedule(scheduler, 2)
    # Block 0, still written by the step in flight, goes to the latecomer: that step runs first.
    assert third == StepPlan(
        step_id=3,
        new_sequences=(NewSequence(2, (200, 201, 202, 203, 204), 5, 0, (1, 0), 5, GREEDY, None),),
        finished_sequence_ids=(1,),
    )
    assert apply(scheduler, executor, second) == []
    assert stopping.output_token_ids == [1003]
    assert apply(scheduler, executor, third) == [SequenceOutput(2, (2005,))]
    assert sorted(executor.token_ids) == [2]


def test_no_placeholder_is_scheduled_past_max_tokens_or_max_model_len() -> None:
    scheduler = make_scheduler(max_model_len=8, enable_prefix_caching=False)
    executor = ExecutorMirror(4, 16)
    capped, filling = make_seq(1, own_prompt(1, 3), max_num_tokens=5), make_seq(2, own_prompt(2, 6))
    scheduler.add_sequence(capped)
    scheduler.add_sequence(filling)
    first = schedule(scheduler, 1)
    second = schedule(scheduler, 2)
    assert second.continued_sequences == (ContinuedSequence(1, 1, ()), ContinuedSequence(2, 1, ()))
    # Both reach their end with the tokens in flight: prompt 3 + 2 = max_num_tokens, 6 + 2 = 8.
    assert scheduler.schedule() is None
    assert apply(scheduler, executor, first) == [SequenceOutput(1, (1003,)), SequenceOutput(2, (2006,))]
    assert scheduler.schedule() is None
    assert apply(scheduler, executor, second) == [SequenceOutput(1, (1004,)), SequenceOutput(2, (2007,))]
    assert (capped.num_tokens, filling.num_tokens) == (5, 8)
    scheduler.finish_sequence(capped.sequence_id)
    scheduler.finish_sequence(filling.sequence_id)
    assert schedule(scheduler, 1) == StepPlan(step_id=3, finished_sequence_ids=(1, 2))


def test_a_recompute_preemption_drops_the_tokens_in_flight_and_resends_only_known_ones() -> None:
    scheduler = make_scheduler(
        num_blocks=4, block_size=2, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=8,
        enable_prefix_caching=False,
    )
    executor = ExecutorMirror(2, 4)
    first, second = make_seq(1, own_prompt(1, 4)), make_seq(2, own_prompt(2, 4))
    scheduler.add_sequence(first)
    scheduler.add_sequence(second)
    plan_a = schedule(scheduler, 1)
    plan_b = schedule(scheduler, 2)
    # Position 4 of each needs a third block; only the first gets one, the second yields with its
    # sampled token (2004) in flight.
    assert plan_b == StepPlan(
        step_id=2, continued_sequences=(ContinuedSequence(1, 1, (3,)),), preempted_sequence_ids=(2,)
    )
    assert (second.num_computed_tokens, second.num_output_placeholders, second.recompute_until) == (0, 0, 4)
    assert apply(scheduler, executor, plan_a) == [SequenceOutput(1, (1004,))]
    assert apply(scheduler, executor, plan_b) == [SequenceOutput(1, (1005,))]
    assert second.output_token_ids == []
    while first.num_output_tokens < 4:
        plan = schedule(scheduler, 1)
        apply(scheduler, executor, plan)
    scheduler.finish_sequence(first.sequence_id)
    plan = schedule(scheduler, 1)
    assert plan.new_sequences == (NewSequence(2, (200, 201, 202, 203), 4, 0, (2, 3), 4, GREEDY, None),)
    assert apply(scheduler, executor, plan) == [SequenceOutput(2, (2004,))]
    assert scheduler.counters.num_tokens_recomputed == 4


def test_a_block_holding_a_placeholder_is_cached_only_once_its_tokens_are_known() -> None:
    scheduler = make_scheduler(num_blocks=8)
    executor = ExecutorMirror(4, 8)
    pool = scheduler.kv_cache_manager.block_pool
    writer = make_seq(1, own_prompt(1, 3))
    scheduler.add_sequence(writer)
    first = schedule(scheduler, 1)
    second = schedule(scheduler, 2)
    # The second step fills block 0 with position 3, whose id (1003) is still in flight.
    assert second.continued_sequences == (ContinuedSequence(1, 1, ()),)
    assert writer.num_computed_tokens == 4 and pool.cached_block_ids() == []
    assert apply(scheduler, executor, first) == [SequenceOutput(1, (1003,))]
    third = schedule(scheduler, 2)
    assert third.continued_sequences == (ContinuedSequence(1, 1, (1,)),)
    assert list(pool.cached_block_ids()) == [0]
    assert apply(scheduler, executor, second) == [SequenceOutput(1, (1004,))]

    reader = make_seq(2, (100, 101, 102, 1003, 7))
    scheduler.add_sequence(reader)
    fourth = schedule(scheduler, 2)
    assert fourth.new_sequences == (NewSequence(2, (100, 101, 102, 1003, 7), 5, 4, (0, 2), 1, GREEDY, None),)
    assert reader.num_cached_prompt_tokens == 4
    assert apply(scheduler, executor, third) == [SequenceOutput(1, (1005,))]
    assert apply(scheduler, executor, fourth) == [SequenceOutput(2, (2005,)), SequenceOutput(1, (1006,))]
