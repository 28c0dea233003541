"""Which executor a new request goes to: the longest exact prefix-cache hit, weighed against load
(cache-aware, the default), or each in turn (round-robin, what a plain load balancer does)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PlacementCandidate:
    """One executor that may take a request, as placement sees it.

    `num_cached_prompt_tokens`: the request's prompt tokens its prefix cache would supply now.
    `num_load_tokens`: the work already placed there: tokens in its used device blocks (a block
    shared by a common prefix counts once, and the request's own cached prefix not at all: it would
    share those blocks) plus those its waiting sequences will compute.
    `num_free_tokens`: what its free device blocks hold (cached free blocks count as free).
    """

    num_cached_prompt_tokens: int
    num_load_tokens: int
    num_free_tokens: int


def placement_cost(candidate: PlacementCandidate, num_prompt_tokens: int) -> int:
    """Tokens of work the request adds to, or waits behind, on this executor.

    Prompt tokens to compute (a cache hit saves them) plus the load already there, so a hot prefix
    keeps winning only until its executor is busier by more than the prefix is long; plus the
    whole prompt again when the free blocks cannot hold it (it would wait, or preempt someone).
    """
    num_to_compute = num_prompt_tokens - candidate.num_cached_prompt_tokens
    cost = num_to_compute + candidate.num_load_tokens
    if candidate.num_free_tokens < num_to_compute:
        cost += num_prompt_tokens
    return cost


def choose_replica(candidates: Sequence[PlacementCandidate], num_prompt_tokens: int) -> int | None:
    """The index of the cheapest candidate (`placement_cost`); ties go to the least loaded (fewest live
    tokens), then the first. None when there is no candidate."""
    if not candidates:
        return None
    return min(
        range(len(candidates)),
        key=lambda i: (placement_cost(candidates[i], num_prompt_tokens), candidates[i].num_load_tokens, i),
    )


def choose_round_robin(candidates: Sequence[PlacementCandidate], num_prompt_tokens: int, turn: int) -> int | None:
    """Starting at `turn` (mod the count), the first candidate whose free blocks hold the prompt, else the
    one at `turn`; None when there is no candidate. Cache hits play no part."""
    if not candidates:
        return None
    order = [(turn + offset) % len(candidates) for offset in range(len(candidates))]
    return next((i for i in order if candidates[i].num_free_tokens >= num_prompt_tokens), order[0])
