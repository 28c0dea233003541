"""The scheduler's policy without the prefix cache, against a mirror of the executor's KV slots."""

from __future__ import annotations

import random

import pytest

from scheduler_service.block_pool import BlockPool
from scheduler_service.kv_cache_manager import KVCacheManager
from scheduler_service.scheduler import Scheduler, StepRejected
from scheduler_service.scheduler_config import SchedulerConfig
from scheduler_service.sequence import Sequence, SequenceStatus
from shared.step_plan import (
    ContinuedSequence,
    NewSequence,
    SequenceId,
    SequenceOutput,
    StepError,
    StepPlan,
    StepResult,
)
from tests.helpers import executor_mirror
from tests.helpers.executor_mirror import GREEDY, ExecutorMirror, own_prompt, sampled_token, step
from tests.helpers.random_aborts import maybe_abort_one


def make_scheduler(**settings: int) -> Scheduler:
    """Without the prefix cache: a preempted sequence here computes its tokens from 0 again."""
    return executor_mirror.make_scheduler(enable_prefix_caching=False, **settings)


def make_seq(sequence_id: int, num_prompt_tokens: int, arrival_index: int | None = None) -> Sequence:
    return Sequence(
        sequence_id=SequenceId(sequence_id),
        prompt_token_ids=own_prompt(sequence_id, num_prompt_tokens),
        arrival_index=sequence_id if arrival_index is None else arrival_index,
    )


def scheduled_tokens(plan: StepPlan) -> dict[int, int]:
    return {s.sequence_id: s.num_scheduled_tokens for s in (*plan.new_sequences, *plan.continued_sequences)}


def test_prefill_then_decode() -> None:
    scheduler = make_scheduler()
    executor = ExecutorMirror(4, 16)
    seq = make_seq(1, 5)
    scheduler.add_sequence(seq)
    assert scheduler.num_waiting == 1 and scheduler.has_work

    plan, outputs = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=1,
        new_sequences=(NewSequence(1, own_prompt(1, 5), 5, 0, (0, 1), 5, GREEDY, None),),
    )
    assert outputs == [SequenceOutput(1, (1005,))]
    assert seq.status is SequenceStatus.RUNNING
    assert seq.num_computed_tokens == 5 and seq.output_token_ids == [1005]

    expected_new_block_ids = [(), (), (), (2,)]
    for step_id, new_block_ids in enumerate(expected_new_block_ids, start=2):
        plan, outputs = step(scheduler, executor)
        assert plan == StepPlan(
            step_id=step_id, continued_sequences=(ContinuedSequence(1, 1, new_block_ids),)
        )
        assert outputs == [SequenceOutput(1, (sampled_token(1, 4 + step_id),))]
    assert seq.output_token_ids == [1005, 1006, 1007, 1008, 1009]
    assert seq.num_computed_tokens == 9
    assert scheduler.kv_cache_manager.block_ids(seq.sequence_id) == (0, 1, 2)
    assert scheduler.num_prompt_tokens_computed == 5

    scheduler.finish_sequence(seq.sequence_id)
    assert seq.status is SequenceStatus.FINISHED
    assert scheduler.kv_cache_manager.num_free_blocks == 16
    plan, outputs = step(scheduler, executor)
    assert plan == StepPlan(step_id=6, finished_sequence_ids=(1,))
    assert outputs == []
    assert scheduler.schedule() is None
    assert not scheduler.has_work


def test_chunked_prefill_exact_token_counts_while_decodes_keep_running() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=6, max_num_seqs=2)
    executor = ExecutorMirror(4, 16)
    short, long = make_seq(1, 3), make_seq(2, 13)
    scheduler.add_sequence(short)
    scheduler.add_sequence(long)

    plan, outputs = step(scheduler, executor)
    assert plan.new_sequences == (
        NewSequence(1, own_prompt(1, 3), 3, 0, (0,), 3, GREEDY, None),
        NewSequence(2, own_prompt(2, 13), 13, 0, (1,), 3, GREEDY, None),
    )
    assert plan.continued_sequences == ()
    assert outputs == [SequenceOutput(1, (1003,))]

    plan, outputs = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=2, continued_sequences=(ContinuedSequence(1, 1, ()), ContinuedSequence(2, 5, (2,)))
    )
    assert outputs == [SequenceOutput(1, (1004,))]
    assert long.num_computed_tokens == 8 and long.output_token_ids == []

    plan, outputs = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=3, continued_sequences=(ContinuedSequence(1, 1, (3,)), ContinuedSequence(2, 5, (4, 5)))
    )
    assert outputs == [SequenceOutput(1, (1005,)), SequenceOutput(2, (2013,))]

    plan, outputs = step(scheduler, executor)
    assert scheduled_tokens(plan) == {1: 1, 2: 1}
    assert short.output_token_ids == [1003, 1004, 1005, 1006]
    assert long.output_token_ids == [2013, 2014]
    assert scheduler.num_prompt_tokens_computed == 16


def test_a_long_prompt_is_chunked_behind_running_decodes_and_blocks_later_arrivals() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4, max_num_seqs=3)
    executor = ExecutorMirror(4, 16)
    for seq in (make_seq(1, 2), make_seq(2, 9), make_seq(3, 2)):
        scheduler.add_sequence(seq)
    per_step = [scheduled_tokens(step(scheduler, executor)[0]) for _ in range(5)]
    assert per_step == [
        {1: 2, 2: 2},
        {1: 1, 2: 3},
        {1: 1, 2: 3},
        {1: 1, 2: 1, 3: 2},
        {1: 1, 2: 1, 3: 1},
    ]


def test_sequence_cap_limits_admission() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    executor = ExecutorMirror(4, 16)
    for sequence_id in (1, 2, 3):
        scheduler.add_sequence(make_seq(sequence_id, 2))
    plan, _ = step(scheduler, executor)
    assert scheduled_tokens(plan) == {1: 2, 2: 2}
    assert [seq.sequence_id for seq in scheduler.waiting] == [3]
    scheduler.finish_sequence(SequenceId(1))
    plan, _ = step(scheduler, executor)
    assert plan.finished_sequence_ids == (1,)
    assert scheduled_tokens(plan) == {2: 1, 3: 2}


def test_admission_waits_for_blocks_without_preempting() -> None:
    scheduler = make_scheduler(num_blocks=8, max_model_len=32)
    executor = ExecutorMirror(4, 8)
    scheduler.add_sequence(make_seq(1, 26))
    scheduler.add_sequence(make_seq(2, 9))
    plan, _ = step(scheduler, executor)
    assert scheduled_tokens(plan) == {1: 16}
    plan, _ = step(scheduler, executor)
    # Sequence 2's 6-token chunk needs 2 blocks but only 1 is free after sequence 1 takes 7.
    assert scheduled_tokens(plan) == {1: 10}
    assert scheduler.num_preemptions == 0
    assert [seq.sequence_id for seq in scheduler.waiting] == [2]
    assert scheduler.kv_cache_manager.num_free_blocks == 1
    plan, _ = step(scheduler, executor)
    assert scheduled_tokens(plan) == {1: 1}
    scheduler.finish_sequence(SequenceId(1))
    plan, _ = step(scheduler, executor)
    assert scheduled_tokens(plan) == {2: 9}
    assert plan.finished_sequence_ids == (1,)


def test_new_sequences_are_sent_once_then_only_new_block_ids() -> None:
    scheduler = make_scheduler(block_size=2)
    executor = ExecutorMirror(2, 16)
    scheduler.add_sequence(make_seq(1, 2))
    plan, _ = step(scheduler, executor)
    assert plan.new_sequences == (NewSequence(1, own_prompt(1, 2), 2, 0, (0,), 2, GREEDY, None),)
    scheduler.add_sequence(make_seq(2, 3))
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=2,
        new_sequences=(NewSequence(2, own_prompt(2, 3), 3, 0, (2, 3), 3, GREEDY, None),),
        continued_sequences=(ContinuedSequence(1, 1, (1,)),),
    )
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=3, continued_sequences=(ContinuedSequence(1, 1, ()), ContinuedSequence(2, 1, ()))
    )
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=4, continued_sequences=(ContinuedSequence(1, 1, (4,)), ContinuedSequence(2, 1, (5,)))
    )


def test_preemption_recomputes_the_latest_arrival_and_it_finishes_with_the_right_tokens() -> None:
    scheduler = make_scheduler(
        num_blocks=4, block_size=2, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=8
    )
    executor = ExecutorMirror(2, 4)
    first, second = make_seq(1, 3), make_seq(2, 3)
    scheduler.add_sequence(first)
    scheduler.add_sequence(second)

    plan, _ = step(scheduler, executor)
    assert [(s.sequence_id, s.block_ids) for s in plan.new_sequences] == [(1, (0, 1)), (2, (2, 3))]
    plan, _ = step(scheduler, executor)
    assert plan.continued_sequences == (ContinuedSequence(1, 1, ()), ContinuedSequence(2, 1, ()))

    # The first sequence needs a third block and none is free: the second (latest) is preempted.
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=3, continued_sequences=(ContinuedSequence(1, 1, (3,)),), preempted_sequence_ids=(2,)
    )
    assert second.status is SequenceStatus.WAITING and second.num_computed_tokens == 0
    assert second.num_preemptions == 1 and scheduler.num_preemptions == 1
    assert second.output_token_ids == [2003, 2004]
    assert list(scheduler.waiting) == [second]
    assert scheduler.kv_cache_manager.block_ids(second.sequence_id) == ()
    assert scheduler.kv_cache_manager.block_pool.free_block_ids() == [2]

    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(step_id=4, continued_sequences=(ContinuedSequence(1, 1, ()),))
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(step_id=5, continued_sequences=(ContinuedSequence(1, 1, (2,)),))
    assert first.output_token_ids == [1003, 1004, 1005, 1006, 1007]
    scheduler.finish_sequence(first.sequence_id)
    assert scheduler.kv_cache_manager.block_pool.free_block_ids() == [2, 3, 1, 0]

    # Resumed in full: the prompt and the two tokens the client already has, recomputed from 0.
    plan, outputs = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=6,
        new_sequences=(NewSequence(2, (200, 201, 202, 2003, 2004), 3, 0, (2, 3, 1), 5, GREEDY, None),),
        finished_sequence_ids=(1,),
    )
    assert outputs == [SequenceOutput(2, (2005,))]
    while second.num_output_tokens < 5:
        step(scheduler, executor)
    assert second.output_token_ids == [2003, 2004, 2005, 2006, 2007]
    scheduler.finish_sequence(second.sequence_id)
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(step_id=9, finished_sequence_ids=(2,))
    assert scheduler.schedule() is None
    assert scheduler.kv_cache_manager.num_free_blocks == 4
    assert scheduler.num_prompt_tokens_computed == 9


def test_a_sequence_preempts_itself_when_it_is_the_latest_arrival() -> None:
    scheduler = make_scheduler(
        num_blocks=4, block_size=2, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=8
    )
    executor = ExecutorMirror(2, 4)
    first, second = make_seq(1, 3), make_seq(2, 4)
    scheduler.add_sequence(first)
    scheduler.add_sequence(second)
    step(scheduler, executor)
    # The first sequence's 4th token fits its 2 blocks; the second's 5th needs a 3rd block, none is
    # free, and the latest-arrived running sequence is the second itself.
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=2, continued_sequences=(ContinuedSequence(1, 1, ()),), preempted_sequence_ids=(2,)
    )
    assert list(scheduler.waiting) == [second] and scheduler.running == [first]
    assert second.output_token_ids == [2004] and second.num_computed_tokens == 0
    assert scheduler.kv_cache_manager.block_pool.free_block_ids() == [3, 2]
    # Its recompute needs 3 blocks; the first sequence takes one of the two free, so it keeps waiting.
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(step_id=3, continued_sequences=(ContinuedSequence(1, 1, (3,)),))
    assert scheduler.num_preemptions == 1


def test_abort_in_every_state_frees_everything() -> None:
    scheduler = make_scheduler(
        num_blocks=4, block_size=2, max_num_batched_tokens=4, max_num_seqs=4, max_model_len=8
    )
    executor = ExecutorMirror(2, 4)
    decoding, prefilling, waiting = make_seq(1, 2), make_seq(2, 5), make_seq(3, 2)
    for seq in (decoding, prefilling, waiting):
        scheduler.add_sequence(seq)
    plan, _ = step(scheduler, executor)
    assert scheduled_tokens(plan) == {1: 2, 2: 2}
    assert prefilling.num_computed_tokens == 2 and list(scheduler.waiting) == [waiting]

    assert scheduler.abort_sequence(waiting.sequence_id)
    assert scheduler.abort_sequence(prefilling.sequence_id)
    assert not scheduler.abort_sequence(prefilling.sequence_id)
    scheduler.check_integrity()
    assert prefilling.status is SequenceStatus.FINISHED and waiting.status is SequenceStatus.FINISHED
    assert scheduler.kv_cache_manager.block_ids(prefilling.sequence_id) == ()
    plan, _ = step(scheduler, executor)
    # The executor never saw sequence 3, so only sequence 2's end is sent.
    assert plan == StepPlan(
        step_id=2, continued_sequences=(ContinuedSequence(1, 1, (2,)),), finished_sequence_ids=(2,)
    )

    assert scheduler.abort_sequence(decoding.sequence_id)
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(step_id=3, finished_sequence_ids=(1,))
    assert scheduler.schedule() is None
    assert not scheduler.has_work
    assert scheduler.kv_cache_manager.num_free_blocks == 4
    assert executor.token_ids == {}


def test_abort_of_a_preempted_sequence_tells_the_executor_nothing() -> None:
    scheduler = make_scheduler(
        num_blocks=4, block_size=2, max_num_batched_tokens=8, max_num_seqs=2, max_model_len=8
    )
    executor = ExecutorMirror(2, 4)
    scheduler.add_sequence(make_seq(1, 4))
    scheduler.add_sequence(make_seq(2, 3))
    step(scheduler, executor)
    plan, _ = step(scheduler, executor)
    assert plan.preempted_sequence_ids == (2,)
    assert scheduler.abort_sequence(SequenceId(2))
    scheduler.finish_sequence(SequenceId(1))
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(step_id=3, finished_sequence_ids=(1,))
    assert scheduler.kv_cache_manager.num_free_blocks == 4


def test_outputs_of_sequences_ended_while_their_plan_was_in_flight_are_dropped() -> None:
    scheduler = make_scheduler()
    executor = ExecutorMirror(4, 16)
    kept, aborted = make_seq(1, 3), make_seq(2, 3)
    scheduler.add_sequence(kept)
    scheduler.add_sequence(aborted)
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.abort_sequence(aborted.sequence_id)
    outputs = scheduler.apply_result(executor.step(plan))
    scheduler.check_integrity()
    assert outputs == [SequenceOutput(1, (1003,))]
    assert aborted.output_token_ids == []
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=2, continued_sequences=(ContinuedSequence(1, 1, ()),), finished_sequence_ids=(2,)
    )


def test_next_plan_is_built_while_one_is_in_flight() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4, max_num_seqs=2)
    executor = ExecutorMirror(4, 16)
    scheduler.add_sequence(make_seq(1, 3))
    scheduler.add_sequence(make_seq(2, 10))
    first = scheduler.schedule()
    second = scheduler.schedule()
    assert first is not None and second is not None
    assert scheduled_tokens(first) == {1: 3, 2: 1}
    # Sequence 1 decodes its sampled token, not known yet, at position 3 of block 0; sequence 2's
    # prompt continues with the budget left, filling its block 1.
    assert second == StepPlan(
        step_id=2, continued_sequences=(ContinuedSequence(1, 1, ()), ContinuedSequence(2, 3, ()))
    )
    assert scheduler.num_in_flight == 2
    with pytest.raises(AssertionError, match="expected step 1"):
        scheduler.apply_result(StepResult(step_id=2))
    first_result, second_result = executor.step(first), executor.step(second)
    assert scheduler.apply_result(first_result) == [SequenceOutput(1, (1003,))]
    assert scheduler.apply_result(second_result) == [SequenceOutput(1, (1004,))]
    scheduler.check_integrity()
    plan, _ = step(scheduler, executor)
    assert plan == StepPlan(
        step_id=3, continued_sequences=(ContinuedSequence(1, 1, (2,)), ContinuedSequence(2, 3, (3,)))
    )


def test_rejected_plan_raises_and_reset_resends_everything_as_new() -> None:
    scheduler = make_scheduler(max_num_seqs=2)
    executor = ExecutorMirror(4, 16)
    decoding, waiting = make_seq(1, 3), make_seq(2, 3)
    scheduler.add_sequence(decoding)
    step(scheduler, executor)
    step(scheduler, executor)
    scheduler.add_sequence(waiting)
    scheduler.add_sequence(make_seq(3, 2))
    plan = scheduler.schedule()
    assert plan is not None
    with pytest.raises(StepRejected, match="status 9"):
        scheduler.apply_result(StepResult(step_id=plan.step_id, error=StepError(9, "unknown sequence 7")))

    scheduler.reset_executor_state()
    scheduler.check_integrity()
    assert scheduler.num_running == 0 and scheduler.num_in_flight == 0
    assert [seq.sequence_id for seq in scheduler.waiting] == [1, 2, 3]
    assert scheduler.kv_cache_manager.num_free_blocks == 16
    assert decoding.output_token_ids == [1003, 1004]

    executor = ExecutorMirror(4, 16)
    plan, outputs = step(scheduler, executor)
    assert plan.step_id == 4
    # Blocks 0-2 were freed last, so the least recently used 3, 4, 5 come first.
    assert plan.new_sequences == (
        NewSequence(1, (100, 101, 102, 1003, 1004), 3, 0, (3, 4), 5, GREEDY, None),
        NewSequence(2, own_prompt(2, 3), 3, 0, (5,), 3, GREEDY, None),
    )
    assert plan.finished_sequence_ids == () and plan.continued_sequences == ()
    assert outputs == [SequenceOutput(1, (1005,)), SequenceOutput(2, (2003,))]


def run_to_completion(seed: int) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(
        num_blocks=9, block_size=4, max_num_batched_tokens=10, max_num_seqs=4, max_model_len=32
    )
    executor = ExecutorMirror(4, 9)
    max_tokens: dict[int, int] = {}
    pending = list(range(1, 13))
    ended: dict[int, Sequence] = {}
    aborted: set[int] = set()
    for _ in range(400):
        if pending and rng.random() < 0.5:
            sequence_id = pending.pop(0)
            seq = make_seq(sequence_id, rng.randint(1, 20))
            max_tokens[sequence_id] = rng.randint(1, 32 - seq.num_prompt_tokens)
            scheduler.add_sequence(seq)
            ended[sequence_id] = seq
        maybe_abort_one(scheduler, rng, aborted)
        plan = scheduler.schedule()
        scheduler.check_integrity()
        if plan is None:
            if not pending and not scheduler.has_work:
                break
            continue
        for output in scheduler.apply_result(executor.step(plan)):
            seq = ended[output.sequence_id]
            if seq.num_output_tokens == max_tokens[output.sequence_id]:
                scheduler.finish_sequence(seq.sequence_id)
        scheduler.check_integrity()
    assert not pending and not scheduler.has_work
    assert scheduler.num_preemptions > 0
    for sequence_id, seq in ended.items():
        assert seq.status is SequenceStatus.FINISHED
        expected = [
            sampled_token(sequence_id, seq.num_prompt_tokens + i) for i in range(seq.num_output_tokens)
        ]
        assert seq.output_token_ids == expected
        if sequence_id not in aborted:
            assert seq.num_output_tokens == max_tokens[sequence_id]
    assert scheduler.kv_cache_manager.num_free_blocks == 9
    assert executor.token_ids == {}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_workload_ends_with_every_block_free(seed: int) -> None:
    run_to_completion(seed)


def test_add_sequence_validates_its_input() -> None:
    scheduler = make_scheduler(max_model_len=8, num_blocks=4)
    scheduler.add_sequence(make_seq(1, 2, arrival_index=5))
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add_sequence(make_seq(1, 2, arrival_index=6))
    with pytest.raises(ValueError, match="max_model_len=8"):
        scheduler.add_sequence(make_seq(2, 9, arrival_index=6))
    with pytest.raises(ValueError, match="arrival_index 5"):
        scheduler.add_sequence(make_seq(3, 2, arrival_index=5))
    assert scheduler.num_waiting == 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_num_seqs": 0}, "max_num_seqs must be at least 1"),
        ({"block_size": 0}, "block_size must be at least 1"),
        (
            {"max_num_batched_tokens": 8, "max_num_seqs": 16},
            "max_num_batched_tokens=8 is below max_num_seqs=16",
        ),
        ({"num_device_blocks": 7}, "cannot hold one sequence of max_model_len=32"),
        ({"preemption_mode": "lru"}, "preemption_mode 'lru' is not supported"),
        ({"preemption_mode": "auto"}, "pass the executor's transfer_speeds"),
        ({"num_host_blocks": -1}, "num_host_blocks must be >= 0"),
    ],
)
def test_config_validation_says_what_to_change(overrides: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"max_model_len": 32, "block_size": 4, "num_device_blocks": 8}
    SchedulerConfig(**settings)
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**{**settings, **overrides})


def test_scheduler_and_pool_must_agree() -> None:
    config = SchedulerConfig(max_model_len=8, block_size=4, num_device_blocks=4)
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(config, KVCacheManager(BlockPool(4), 2))
    with pytest.raises(ValueError, match="num_device_blocks"):
        Scheduler(config, KVCacheManager(BlockPool(5), 4))
