"""The one record of the plans in flight: what each samples, sequences forgotten, results in order."""

from __future__ import annotations

import pytest

from scheduler_service.in_flight_plans import InFlightPlans, PlanInFlight
from shared.step_plan import ContinuedSequence, SequenceId, StepPlan

A, B, C = SequenceId(1), SequenceId(2), SequenceId(3)


def plan(step_id: int) -> StepPlan:
    return StepPlan(step_id=step_id, continued_sequences=(ContinuedSequence(A, 1), ContinuedSequence(B, 1)))


def test_plans_come_back_oldest_first_with_what_they_sampled_when_sent() -> None:
    in_flight = InFlightPlans()
    first, second = plan(1), plan(2)
    in_flight.append(first, {A: True, B: True, C: False})
    in_flight.append(second, {A: True, B: True})
    assert len(in_flight) == 2 and in_flight.num_tokens_sampled() == {A: 2, B: 2, C: 0}
    in_flight.forget(B)  # ended or preempted: its tokens in flight are dropped
    assert in_flight.num_tokens_sampled() == {A: 2, C: 0}
    with pytest.raises(AssertionError, match="result for step 2, expected step 1"):
        in_flight.pop_oldest(2)
    # The sampling count stays what the plan was sent with (the step-time fit reads it).
    assert in_flight.pop_oldest(1) == PlanInFlight(first, {A: True, C: False}, num_sampling_sequences=2)
    assert in_flight.pop_oldest(2) == PlanInFlight(second, {A: True}, num_sampling_sequences=2)
    assert len(in_flight) == 0
    with pytest.raises(AssertionError, match="no plan in flight"):
        in_flight.pop_oldest(3)


def test_clear_forgets_every_plan() -> None:
    in_flight = InFlightPlans()
    in_flight.append(plan(1), {A: True})
    in_flight.clear()
    assert len(in_flight) == 0 and in_flight.num_tokens_sampled() == {}
