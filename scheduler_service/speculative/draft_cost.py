"""What the executor's draft model costs per draft token, learned from the steps run."""

from __future__ import annotations

from dataclasses import dataclass

# Each observation weighs this much against everything before it (exponential forgetting).
_FORGET = 0.1


@dataclass(slots=True)
class DraftCost:
    """Seconds of draft-model time per draft token it proposed, smoothed over the steps that drafted.

    The executor's draft time also covers the draft's pass over the step's known tokens (what keeps its
    KV in step with the target's), so this over-states the cost of drafting in a large batch: the
    policy then drafts less under load, never more. 0 until a step with model drafts was seen (n-gram
    drafts cost the executor nothing)."""

    seconds_per_draft_token: float = 0.0
    _num_observed: int = 0

    def observe(self, num_draft_tokens: int, draft_seconds: float) -> None:
        if num_draft_tokens <= 0 or draft_seconds <= 0:
            return
        rate = draft_seconds / num_draft_tokens
        weight = 1.0 if self._num_observed == 0 else _FORGET
        self.seconds_per_draft_token += (rate - self.seconds_per_draft_token) * weight
        self._num_observed += 1
