"""When a request stops, and which of its tokens and text reach the client (vLLM's stop semantics).

The engine drives one `StopChecker` per request, for each output delta `ids`:

    verdict = checker.scan_tokens(ids)
    text = detokenizer.push(ids[: verdict.num_tokens_to_detokenize])
    if verdict.finish_reason is not None:
        text += detokenizer.flush()
    decision = checker.check(ids, text)
    emit(ids[: decision.num_tokens_to_emit], decision.text_to_emit)

so that the text of a stop token (EOS or a stop_token_ids entry) and of tokens after it is never decoded.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from shared.sampling_params import SamplingParams


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"


@dataclass(frozen=True, slots=True)
class TokenVerdict:
    """What the token ids of one delta decide on their own, before their text is known.

    `num_tokens_to_detokenize` leaves out a stop token: its id is emitted, its text is not.
    """

    num_tokens_to_emit: int
    num_tokens_to_detokenize: int
    finish_reason: FinishReason | None
    stop_token_id: int | None


@dataclass(frozen=True, slots=True)
class StopDecision:
    """What to send for one delta. `stop_reason` is the stop token id or stop string that ended the
    request (None for LENGTH or when still running)."""

    finish_reason: FinishReason | None
    num_tokens_to_emit: int
    text_to_emit: str
    stop_reason: int | str | None = None


class StopChecker:
    """The stop conditions of one request.

    Token rules, in order for each output token: EOS (unless `ignore_eos`) and stop_token_ids stop with
    STOP, but only from the `min_tokens`-th output token on (that token included); then the
    `max_tokens`-th output token, or the token that makes prompt + output reach `max_model_len`, stops
    with LENGTH (a stop token at that position reports STOP). Tokens after the stopping one are dropped.

    Text rule: the emitted text is the full text cut right before the first stop string to complete
    (reading left to right; of two completing at the same character, the longer), so the cut does not
    depend on how the text was split into deltas. Occurrences count only once more than `min_tokens`
    tokens exist and only if they end in text that arrived from then on (vLLM checks only new text).
    A stop string finishes with STOP and every token of its delta is emitted. To cut across deltas, the
    last `max(len(s)) - 1` characters are withheld until more text shows they do not start a stop
    string, or the request finishes.
    """

    def __init__(
        self,
        params: SamplingParams,
        eos_token_ids: Sequence[int],
        max_model_len: int,
        num_prompt_tokens: int,
    ) -> None:
        self._params = params
        self._stop_token_ids = frozenset(params.stop_token_ids) | (
            frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        )
        self._max_model_len = max_model_len
        self._num_prompt_tokens = num_prompt_tokens
        self._num_withheld_chars = max((len(stop) for stop in params.stop), default=1) - 1
        self._num_output_tokens = 0
        self._num_released_chars = 0
        self._withheld_text = ""
        self._stop_search_start: int | None = None
        self._finish_reason: FinishReason | None = None

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._finish_reason

    @property
    def is_finished(self) -> bool:
        return self._finish_reason is not None

    def scan_tokens(self, new_token_ids: Sequence[int]) -> TokenVerdict:
        """Applies the token rules to a delta without changing any state."""
        num_output_tokens = self._num_output_tokens
        max_tokens = self._params.max_tokens
        for index, token_id in enumerate(new_token_ids):
            num_output_tokens += 1
            if num_output_tokens >= self._params.min_tokens and token_id in self._stop_token_ids:
                return TokenVerdict(index + 1, index, FinishReason.STOP, token_id)
            at_max_tokens = max_tokens is not None and num_output_tokens >= max_tokens
            if at_max_tokens or self._num_prompt_tokens + num_output_tokens >= self._max_model_len:
                return TokenVerdict(index + 1, index + 1, FinishReason.LENGTH, None)
        return TokenVerdict(len(new_token_ids), len(new_token_ids), None, None)

    def check(self, new_token_ids: Sequence[int], new_text: str) -> StopDecision:
        """Consumes one delta. `new_text` is the detokenized text of its first
        `scan_tokens(new_token_ids).num_tokens_to_detokenize` tokens (see the module docstring).
        A decision that finishes releases all withheld text; the checker accepts nothing afterwards."""
        if self._finish_reason is not None:
            raise RuntimeError(f"the request already finished ({self._finish_reason.value}); stop sending it deltas")
        verdict = self.scan_tokens(new_token_ids)
        self._num_output_tokens += verdict.num_tokens_to_emit
        text = self._withheld_text + new_text
        text_start = self._num_released_chars
        if self._stop_search_start is None and self._num_output_tokens > self._params.min_tokens:
            self._stop_search_start = text_start + len(self._withheld_text)
        match = self._find_stop_string(text, text_start)
        if match is not None:
            index, stop = match
            return self._finish(FinishReason.STOP, verdict.num_tokens_to_emit, text[:index], stop)
        if verdict.finish_reason is not None:
            reason = verdict.finish_reason
            return self._finish(reason, verdict.num_tokens_to_emit, text, verdict.stop_token_id)
        num_released = max(len(text) - self._num_withheld_chars, 0)
        self._withheld_text = text[num_released:]
        self._num_released_chars += num_released
        return StopDecision(None, verdict.num_tokens_to_emit, text[:num_released])

    def flush(self) -> str:
        """Releases the withheld text (empty after a finishing decision, which released it already)."""
        text = self._withheld_text
        self._num_released_chars += len(text)
        self._withheld_text = ""
        return text

    def check_integrity(self) -> None:
        """Withheld text never exceeds what a stop string needs; the token count respects max_tokens."""
        assert len(self._withheld_text) <= self._num_withheld_chars
        assert self._finish_reason is None or not self._withheld_text
        max_tokens = self._params.max_tokens
        assert max_tokens is None or self._num_output_tokens <= max_tokens

    def _find_stop_string(self, text: str, text_start: int) -> tuple[int, str] | None:
        """The stop string in `text` (which starts at absolute char `text_start`) that completes first
        after `_stop_search_start`, as (index in `text`, stop string); of two ending together, the longer."""
        if self._stop_search_start is None:
            return None
        best: tuple[int, int, str] | None = None
        for stop in self._params.stop:
            search_from = max(self._stop_search_start - text_start - len(stop) + 1, 0)
            index = text.find(stop, search_from)
            if index != -1 and (best is None or (index + len(stop), index) < best[:2]):
                best = (index + len(stop), index, stop)
        return None if best is None else (best[1], best[2])

    def _finish(
        self, reason: FinishReason, num_tokens_to_emit: int, text_to_emit: str, stop_reason: int | str | None
    ) -> StopDecision:
        self._finish_reason = reason
        self._num_released_chars += len(text_to_emit)
        self._withheld_text = ""
        return StopDecision(reason, num_tokens_to_emit, text_to_emit, stop_reason)
