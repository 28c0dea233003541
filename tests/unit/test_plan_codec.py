"""Plans and results survive the wire unchanged: every field the scheduler and executor exchange."""

from __future__ import annotations

from shared.plan_codec import plan_from_pb, plan_to_pb, result_from_pb, result_to_pb
from shared.step_plan import (
    AdapterLoad,
    BlockPairs,
    ContinuedSequence,
    NewSequence,
    SamplingOptions,
    SequenceId,
    SequenceOutput,
    StepError,
    StepPlan,
    StepResult,
    StepTiming,
)


def test_a_plan_with_every_field_round_trips() -> None:
    plan = StepPlan(
        step_id=7,
        new_sequences=(
            NewSequence(SequenceId(1), (5, 6, 7), 2, 1, (3, 4), 2, SamplingOptions(), lora_slot=1),
            NewSequence(SequenceId(2), (8,), 1, 0, (9,), 1, SamplingOptions()),
        ),
        continued_sequences=(ContinuedSequence(SequenceId(3), 1, (11,)),),
        finished_sequence_ids=(4,),
        preempted_sequence_ids=(5,),
        swap_out=BlockPairs((1, 2), (0, 1)),
        swap_in=BlockPairs(),
        copy=BlockPairs((6,), (7,)),
        adapter_loads=(AdapterLoad(slot=1, adapter_name="a", adapter_path="/adapters/a"),),
    )
    assert plan_from_pb(plan_to_pb(plan)) == plan


def test_a_result_with_outputs_round_trips() -> None:
    result = StepResult(
        step_id=3,
        outputs=(SequenceOutput(SequenceId(1), (42,), (-0.5,), (((42, -0.5), (7, -1.5)),)), SequenceOutput(SequenceId(2))),
        timing=StepTiming(0.5, 0.25, 0.125, 0.0625, 9),
    )
    assert result_from_pb(result_to_pb(result)) == result


def test_an_error_names_the_unreadable_adapters_slot_only_when_set() -> None:
    for error in (StepError(3, "adapter 'a' cannot be loaded", adapter_slot=0), StepError(9, "slot 2 is empty")):
        assert result_from_pb(result_to_pb(StepResult(step_id=4, error=error))).error == error
