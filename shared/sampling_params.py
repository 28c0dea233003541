"""A request's sampling parameters, their validation, and the executor-facing subset.

Validation raises `InvalidArgument` with a message that says what to change; the scheduler calls it at
the API boundary and the executor again on every plan (it trusts nothing it did not check).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shared.errors import InvalidArgument
from shared.request_limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from shared.step_plan import SamplingOptions

MAX_PENALTY = 2.0


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Everything a client may set about one generation; `None` means "the server's default"."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    # Scheduler-side only: whether this request may be speculated (never changes its tokens).
    speculative: bool = True

    def to_options(self, eos_token_ids: tuple[int, ...]) -> SamplingOptions:
        """The executor's view: before `min_tokens` output tokens, the stop token ids and EOS are banned;
        with `ignore_eos` EOS is not banned (it may be sampled and never stops the request), as in vLLM."""
        banned = tuple(dict.fromkeys((() if self.ignore_eos else eos_token_ids) + self.stop_token_ids))
        return SamplingOptions(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            logprobs=self.logprobs,
            min_tokens=self.min_tokens,
            banned_token_ids_before_min_tokens=banned if self.min_tokens > 0 else (),
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidArgument(message)


def validate_sampling_options(options: SamplingOptions, vocab_size: int, max_logprobs: int) -> None:
    """Checks the values both services must agree on; raises InvalidArgument naming the field."""
    t = options.temperature
    _require(math.isfinite(t) and t >= 0.0, f"temperature must be a finite number >= 0 (0 = greedy), got {t}")
    p = options.top_p
    _require(math.isfinite(p) and 0.0 < p <= 1.0, f"top_p must be in (0, 1], got {p}")
    _require(options.top_k >= -1, f"top_k must be -1 or 0 (disabled) or >= 1, got {options.top_k}")
    m = options.min_p
    _require(math.isfinite(m) and 0.0 <= m <= 1.0, f"min_p must be in [0, 1], got {m}")
    r = options.repetition_penalty
    _require(math.isfinite(r) and 0.0 < r <= 100.0, f"repetition_penalty must be in (0, 100] (1 = off), got {r}")
    for name, value in (("presence_penalty", options.presence_penalty), ("frequency_penalty", options.frequency_penalty)):
        _require(
            math.isfinite(value) and -MAX_PENALTY <= value <= MAX_PENALTY,
            f"{name} must be in [-{MAX_PENALTY}, {MAX_PENALTY}] (0 = off), got {value}",
        )
    if options.logprobs is not None:
        _require(
            0 <= options.logprobs <= max_logprobs,
            f"logprobs must be between 0 and {max_logprobs}, got {options.logprobs}",
        )
    _require(options.min_tokens >= 0, f"min_tokens must be >= 0, got {options.min_tokens}")
    bad = [i for i in options.banned_token_ids_before_min_tokens if not 0 <= i < vocab_size]
    _require(not bad, f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    if options.seed is not None:
        _require(0 <= options.seed < 2**64, f"seed must fit in an unsigned 64-bit integer, got {options.seed}")


def validate_sampling_params(
    params: SamplingParams, vocab_size: int, max_logprobs: int, max_model_len: int, num_prompt_tokens: int
) -> None:
    """The API boundary check of one request; raises InvalidArgument saying what to change."""
    validate_sampling_options(params.to_options(()), vocab_size, max_logprobs)
    _require(
        num_prompt_tokens < max_model_len,
        f"the prompt has {num_prompt_tokens} tokens, which leaves no room for output under max_model_len "
        f"({max_model_len}); shorten the prompt to at most {max_model_len - 1} tokens",
    )
    room = max_model_len - num_prompt_tokens
    if params.max_tokens is not None:
        _require(params.max_tokens >= 1, f"max_tokens must be >= 1, got {params.max_tokens}")
        _require(
            params.max_tokens <= room,
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({params.max_tokens}) exceeds max_model_len "
            f"({max_model_len}); lower max_tokens to at most {room} or shorten the prompt",
        )
        _require(
            params.min_tokens <= params.max_tokens,
            f"min_tokens ({params.min_tokens}) must not exceed max_tokens ({params.max_tokens})",
        )
    _require(
        params.min_tokens <= room,
        f"min_tokens ({params.min_tokens}) cannot be reached: the prompt ({num_prompt_tokens} tokens) leaves "
        f"room for {room} output tokens under max_model_len ({max_model_len}); lower min_tokens to at most "
        f"{room}",
    )
    bad = [i for i in params.stop_token_ids if not 0 <= i < vocab_size]
    _require(not bad, f"stop_token_ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    _require(all(s for s in params.stop), "stop strings must not be empty")
    _require(
        len(params.stop) <= MAX_STOP_STRINGS,
        f"{len(params.stop)} stop strings given; send at most {MAX_STOP_STRINGS}",
    )
    longest = max((len(s) for s in params.stop), default=0)
    _require(
        longest <= MAX_STOP_STRING_CHARS,
        f"a stop string has {longest} characters; each may have at most {MAX_STOP_STRING_CHARS}",
    )
