"""What the scheduler asks of a speculative-decoding proposer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from scheduler_service.speculative.ngram_proposer import NgramProposer
from scheduler_service.speculative.speculative_config import SpeculativeConfig


class DraftProposer(Protocol):
    """Proposes draft tokens for one sequence from its known tokens; `num_speculative_tokens` bounds k."""

    num_speculative_tokens: int

    def propose(self, token_ids: Sequence[int], k: int) -> tuple[int, ...]: ...


def proposer_from(config: SpeculativeConfig | None) -> DraftProposer | None:
    if config is None:
        return None
    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max, config.num_speculative_tokens)
