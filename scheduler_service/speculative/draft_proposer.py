"""What the scheduler asks of a speculative-decoding proposer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from scheduler_service.speculative.ngram_proposer import NgramProposer
from shared.speculative_config import SpeculativeConfig


class DraftProposer(Protocol):
    """Proposes draft tokens for one sequence from its known tokens; `num_speculative_tokens` bounds k."""

    num_speculative_tokens: int

    def propose(self, token_ids: Sequence[int], k: int) -> tuple[int, ...]: ...


class ExecutorDraftModel:
    """draft_model speculation: the executor's draft model proposes, so `propose` is never called; the
    scheduler picks k, the plan asks for k model drafts (`ContinuedSequence.num_model_drafts`) and the
    result says which drafts were proposed (`SequenceOutput.draft_token_ids`)."""

    def __init__(self, num_speculative_tokens: int) -> None:
        self.num_speculative_tokens = num_speculative_tokens

    def propose(self, token_ids: Sequence[int], k: int) -> tuple[int, ...]:
        raise AssertionError("the executor's draft model proposes these drafts")


def proposer_from(config: SpeculativeConfig | None, max_model_drafts: int = 0) -> DraftProposer | None:
    """The proposer `config` names; for a draft model, ValueError unless the executor has one that drafts
    at least `num_speculative_tokens` (its `max_model_drafts`)."""
    if config is None:
        return None
    if config.uses_draft_model:
        if max_model_drafts < config.num_speculative_tokens:
            has = "no draft model" if max_model_drafts == 0 else f"a draft model for at most {max_model_drafts} drafts"
            raise ValueError(
                f"--speculative-config asks for {config.num_speculative_tokens} drafts of a draft model but the "
                f"executor has {has}: start it with the same --speculative-config"
            )
        return ExecutorDraftModel(config.num_speculative_tokens)
    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max, config.num_speculative_tokens)
