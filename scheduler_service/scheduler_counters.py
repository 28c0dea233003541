"""Cumulative scheduler counters since start-up: what ServerInfo reports about caching and preemption."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SchedulerCounters:
    """Only ever incremented. Prompt tokens count prompt positions: `computed` those the executor was
    asked to compute (recomputation included), `cached` those served from the prefix cache instead.
    `num_tokens_recomputed` counts tokens computed again because a recompute preemption (or a lost
    executor) dropped their K/V."""

    num_preemptions_recompute: int = 0
    num_preemptions_swap: int = 0
    num_blocks_swapped_out: int = 0
    num_blocks_swapped_in: int = 0
    num_tokens_recomputed: int = 0
    num_prompt_tokens_computed: int = 0
    num_prompt_tokens_cached: int = 0

    @property
    def num_preemptions(self) -> int:
        return self.num_preemptions_recompute + self.num_preemptions_swap
