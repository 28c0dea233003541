"""Cumulative scheduler counters since start-up: what ServerInfo reports about caching and preemption."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SchedulerCounters:
    """Only ever incremented. Prompt tokens count prompt positions: `computed` those the executor was
    asked to compute (recomputation included), `cached` those served from the prefix cache instead.
    `num_tokens_recomputed` counts tokens computed again because a recompute preemption (or a lost
    executor) dropped their K/V. Speculative decoding: `num_drafts` steps verified drafts for a sequence,
    `num_draft_tokens` tokens they proposed, `num_accepted_draft_tokens` of them were accepted, and
    `num_accepted_per_position[j]` how often the draft token at position j was.
    """

    num_preemptions_recompute: int = 0
    num_preemptions_swap: int = 0
    num_blocks_swapped_out: int = 0
    num_blocks_swapped_in: int = 0
    num_tokens_recomputed: int = 0
    num_prompt_tokens_computed: int = 0
    num_prompt_tokens_cached: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    num_accepted_per_position: list[int] = field(default_factory=list)

    def count_draft(self, num_draft_tokens: int, num_accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_draft_tokens += num_accepted
        if len(self.num_accepted_per_position) < num_draft_tokens:
            self.num_accepted_per_position.extend([0] * (num_draft_tokens - len(self.num_accepted_per_position)))
        for position in range(num_accepted):
            self.num_accepted_per_position[position] += 1

    @property
    def num_preemptions(self) -> int:
        return self.num_preemptions_recompute + self.num_preemptions_swap
