"""Incremental detokenization: the new text of each output delta, decoded over a small window of tokens."""

from __future__ import annotations

from collections.abc import Sequence

from scheduler_service.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: prompt tokens decoded as left context, so that the
# first output token decodes as it does mid-text (a SentencePiece word's leading space survives).
NUM_PROMPT_CONTEXT_TOKENS = 5
# A UTF-8 character is at most 4 bytes, so only the last 4 pending tokens can still be waiting for their
# character's end; past MAX_PENDING_TOKENS the earlier ones are released (their U+FFFD is real).
MAX_PENDING_TOKENS = 8
MAX_TOKENS_PER_CHARACTER = 4


class IncrementalDetokenizer:
    """Turns a request's output tokens into text deltas, following vLLM's prefix/read offset algorithm.

    The window is `context_ids` (tokens whose text was already returned, kept as left context) followed by
    `pending_ids` (tokens whose text is not returned yet). A push decodes the window twice, with and
    without the pending tokens, and returns the difference, unless the text ends in U+FFFD: then a
    multi-byte character may be split across tokens and its text is withheld until it completes.

    Contract: for a byte-level tokenizer, the concatenation of every `push` plus the final `flush` equals
    `tokenizer.decode(all pushed ids, skip_special_tokens)`; without `flush`, it does so whenever the
    output does not end mid-character. The window holds at most the tokens of the last two pushes that
    produced text, and pending tokens past MAX_PENDING_TOKENS are released, so a push costs O(delta),
    never O(output length).
    When `skip_special_tokens` is set, special ids never enter the window.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._context_ids: list[int] = self._visible(prompt_token_ids)[-NUM_PROMPT_CONTEXT_TOKENS:]
        self._pending_ids: list[int] = []

    def push(self, token_ids: Sequence[int]) -> str:
        """Appends output tokens; returns only the text that became final since the last call."""
        self._pending_ids.extend(self._visible(token_ids))
        if not self._pending_ids:
            return ""
        context_text = self._decode(self._context_ids)
        full_text = self._decode(self._context_ids + self._pending_ids)
        if len(full_text) > len(context_text) and not full_text.endswith(REPLACEMENT_CHAR):
            return self._advance(len(self._pending_ids), full_text, context_text)
        if len(self._pending_ids) > MAX_PENDING_TOKENS:
            return self._release_settled(full_text, context_text)
        return ""

    def flush(self) -> str:
        """The withheld text (possibly ending in U+FFFD); call once the request has ended."""
        if not self._pending_ids:
            return ""
        context_text = self._decode(self._context_ids)
        full_text = self._decode(self._context_ids + self._pending_ids)
        return self._advance(len(self._pending_ids), full_text, context_text)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens pushed whose text has not been returned yet."""
        return len(self._pending_ids)

    def check_integrity(self) -> None:
        """When skipping special tokens, none is in the window."""
        if self._skip_special_tokens:
            window = self._context_ids + self._pending_ids
            assert not any(self._tokenizer.is_special(token_id) for token_id in window)

    def _advance(self, num_settled: int, settled_text: str, context_text: str) -> str:
        """Returns the text of the first `num_settled` pending tokens; they become the new context."""
        new_text = settled_text[len(context_text) :] if len(settled_text) > len(context_text) else ""
        self._context_ids = self._pending_ids[:num_settled]
        self._pending_ids = self._pending_ids[num_settled:]
        return new_text

    def _release_settled(self, full_text: str, context_text: str) -> str:
        """Bounds the window when the text keeps ending in U+FFFD (a stream of invalid bytes).

        A prefix of the pending tokens is settled when its text is a prefix of the full text and at least
        MAX_TOKENS_PER_CHARACTER tokens follow it: no later token can complete a character it ends in.
        """
        for num_settled in range(len(self._pending_ids) - MAX_TOKENS_PER_CHARACTER, 0, -1):
            settled_text = self._decode(self._context_ids + self._pending_ids[:num_settled])
            if len(settled_text) >= len(context_text) and full_text.startswith(settled_text):
                return self._advance(num_settled, settled_text, context_text)
        return ""

    def _visible(self, token_ids: Sequence[int]) -> list[int]:
        if not self._skip_special_tokens:
            return list(token_ids)
        return [token_id for token_id in token_ids if not self._tokenizer.is_special(token_id)]

    def _decode(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special_tokens)
