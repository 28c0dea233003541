"""A sequence as the scheduler sees it: its tokens and how many of them have K/V computed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from scheduler_service.lora.adapter_registry import Adapter
from scheduler_service.speculative.speculation_policy import PRIOR_ACCEPTANCE
from shared.step_plan import SamplingOptions, SequenceId


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    # Preempted by swap: waits like WAITING, but its computed K/V sits in host blocks.
    SWAPPED = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True, eq=False)
class Sequence:
    """The scheduling state of one request: `num_computed_tokens` chases `num_tokens`.

    Prefill, chunked prefill, resume after preemption and decode are all "compute the tokens from
    num_computed_tokens up to num_tokens"; the executor samples a new token whenever a step's tokens
    reach the end. Request-level state (stop conditions, max_tokens, detokenizer) lives in the engine.
    With several plans in flight, a running sequence is scheduled again before the token its last
    step samples is known: that token is an output placeholder, a position with no id yet, whose K/V
    the next step computes (the executor appended the sampled id itself). `num_output_placeholders`
    counts the tokens sampled by plans in flight; `num_computed_tokens` counts placeholder positions
    too. `max_num_tokens` is where the request ends for sure (prompt + max_tokens), None when only
    max_model_len bounds it: no placeholder is scheduled past it.
    `arrival_index` is monotonic over requests; a lower index has higher priority.
    The adapter's `key` and `cache_salt` are the prefix cache's extra keys: sequences share cached K/V
    only when both are equal. `lora_slot` is the executor slot holding the adapter while it runs. `num_cached_prompt_tokens` is what the prefix cache supplied at the first
    admission (None before it); `recompute_until` marks the tokens whose K/V a recompute preemption
    dropped, so computing them again is counted as recomputation.
    Invariant: 0 <= num_computed_tokens <= num_tokens + num_output_placeholders.
    """

    sequence_id: SequenceId
    prompt_token_ids: tuple[int, ...]
    arrival_index: int
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    lora_slot: int | None = None
    adapter: Adapter | None = None
    cache_salt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    num_preemptions: int = 0
    num_cached_prompt_tokens: int | None = None
    recompute_until: int = 0
    num_output_placeholders: int = 0
    max_num_tokens: int | None = None
    # Speculative decoding: whether the request allows it, and the drafts of the step in flight: tokens
    # proposed here, or how many the executor's draft model proposes (known when the result comes).
    speculative: bool = True
    draft_token_ids: tuple[int, ...] = ()
    num_model_drafts: int = 0
    # Per-token acceptance of its drafts (accepted / tried), smoothed over verifications (SpeculationPolicy).
    draft_acceptance: float = PRIOR_ACCEPTANCE

    def __post_init__(self) -> None:
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"sequence {self.sequence_id} has an empty prompt; send at least one token")

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The prompt followed by every output token so far."""
        return self.prompt_token_ids + tuple(self.output_token_ids)

    @property
    def cache_extra_keys(self) -> tuple[str | None, ...]:
        return (None if self.adapter is None else self.adapter.key, self.cache_salt)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return self.num_tokens + self.num_output_placeholders

    @property
    def num_draft_tokens(self) -> int:
        """Draft tokens the step in flight verifies, whoever proposes them."""
        return len(self.draft_token_ids) + self.num_model_drafts

    def num_tokens_limit(self, max_model_len: int) -> int:
        """The length the sequence can never exceed: its request ends at it at the latest."""
        return max_model_len if self.max_num_tokens is None else min(self.max_num_tokens, max_model_len)

    def drop_drafts(self) -> None:
        self.draft_token_ids = ()
        self.num_model_drafts = 0

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens, placeholders included, whose K/V is neither computed nor scheduled."""
        return self.num_tokens_with_placeholders - self.num_computed_tokens
