"""The plans sent to the executor whose results have not come back yet, oldest first."""

from __future__ import annotations

from collections import deque

from shared.step_plan import SequenceId


class InFlightPlans:
    """Per plan in flight, its step id and, per scheduled sequence still live and not preempted since,
    whether the step samples a token for it.

    Results come back in the order plans were sent, so `pop_oldest` is checked against the step id.
    A sequence that ends or is preempted is `forget`-ten in every plan, so its tokens sampled in flight
    are dropped when their results arrive.
    """

    def __init__(self) -> None:
        self._plans: deque[tuple[int, dict[SequenceId, bool]]] = deque()

    def __len__(self) -> int:
        return len(self._plans)

    def append(self, step_id: int, samples: dict[SequenceId, bool]) -> None:
        self._plans.append((step_id, samples))

    def pop_oldest(self, step_id: int) -> dict[SequenceId, bool]:
        """The samples of the oldest plan, which must be step `step_id`; removes it."""
        assert self._plans, f"result for step {step_id} arrived with no plan in flight"
        oldest_step_id, samples = self._plans[0]
        assert step_id == oldest_step_id, f"result for step {step_id}, expected step {oldest_step_id}"
        self._plans.popleft()
        return samples

    def forget(self, sequence_id: SequenceId) -> None:
        """Drop the sequence from every plan in flight: its results will be ignored."""
        for _, samples in self._plans:
            samples.pop(sequence_id, None)

    def clear(self) -> None:
        self._plans.clear()

    def num_tokens_sampled(self) -> dict[SequenceId, int]:
        """Per sequence, how many tokens the plans in flight sample for it."""
        counts: dict[SequenceId, int] = {}
        for _, samples in self._plans:
            for sequence_id, sampled in samples.items():
                counts[sequence_id] = counts.get(sequence_id, 0) + sampled
        return counts
