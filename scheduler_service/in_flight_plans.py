"""The plans sent to the executor whose results have not come back yet, oldest first."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from shared.step_plan import SequenceId, StepPlan


@dataclass(frozen=True, slots=True)
class PlanInFlight:
    """A plan sent whose result has not come back.

    `samples`: per scheduled sequence still live and not preempted since, whether the step samples a
    token for it (entries leave as sequences are forgotten and as the result is applied);
    `num_sampling_sequences`: how many of its sequences it sampled for when it was sent."""

    plan: StepPlan
    samples: dict[SequenceId, bool]
    num_sampling_sequences: int

    @property
    def step_id(self) -> int:
        return self.plan.step_id


class InFlightPlans:
    """The one record of the plans in flight, each a `PlanInFlight`.

    Results come back in the order plans were sent, so `pop_oldest` is checked against the step id.
    A sequence that ends or is preempted is `forget`-ten in every plan, so its tokens sampled in flight
    are dropped when their results arrive.
    """

    def __init__(self) -> None:
        self._plans: deque[PlanInFlight] = deque()

    def __len__(self) -> int:
        return len(self._plans)

    def append(self, plan: StepPlan, samples: dict[SequenceId, bool]) -> None:
        self._plans.append(PlanInFlight(plan, samples, sum(samples.values())))

    def pop_oldest(self, step_id: int) -> PlanInFlight:
        """The oldest plan, which must be step `step_id`; removes it."""
        assert self._plans, f"result for step {step_id} arrived with no plan in flight"
        oldest = self._plans[0]
        assert step_id == oldest.step_id, f"result for step {step_id}, expected step {oldest.step_id}"
        return self._plans.popleft()

    def forget(self, sequence_id: SequenceId) -> None:
        """Drop the sequence from every plan in flight: its results will be ignored."""
        for sent in self._plans:
            sent.samples.pop(sequence_id, None)

    def clear(self) -> None:
        self._plans.clear()

    def num_tokens_sampled(self) -> dict[SequenceId, int]:
        """Per sequence, how many tokens the plans in flight sample for it."""
        counts: dict[SequenceId, int] = {}
        for sent in self._plans:
            for sequence_id, sampled in sent.samples.items():
                counts[sequence_id] = counts.get(sequence_id, 0) + sampled
        return counts
