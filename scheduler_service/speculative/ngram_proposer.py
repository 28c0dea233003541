"""Prompt lookup: draft tokens copied from where the sequence's latest n-gram occurred before."""

from __future__ import annotations

from collections.abc import Sequence


class NgramProposer:
    """Proposes up to k tokens for a sequence from its own tokens (prompt and output), as vLLM's
    n-gram proposer: for n from `max_n` down to `min_n`, find the latest earlier occurrence of the
    last n tokens and propose the tokens that followed it. Pure and deterministic; no model."""

    def __init__(self, min_n: int, max_n: int, num_speculative_tokens: int) -> None:
        assert 1 <= min_n <= max_n and num_speculative_tokens >= 1
        self.min_n = min_n
        self.max_n = max_n
        self.num_speculative_tokens = num_speculative_tokens

    def propose(self, token_ids: Sequence[int], k: int) -> tuple[int, ...]:
        """At most `k` draft tokens; () when no n-gram of the allowed lengths repeats."""
        token_ids = tuple(token_ids)
        num_tokens = len(token_ids)
        if k < 1:
            return ()
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            suffix = token_ids[num_tokens - n :]
            # The latest earlier occurrence (it may overlap the suffix, never be it).
            for start in range(num_tokens - n - 1, -1, -1):
                if token_ids[start] == suffix[0] and token_ids[start : start + n] == suffix:
                    follow = token_ids[start + n : start + n + k]
                    if follow:
                        return tuple(follow)
        return ()
