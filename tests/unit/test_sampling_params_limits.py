"""SamplingParams' boundary rules (issue 14): the min_tokens / ignore_eos rule and the messages of the
length checks, against `validate_sampling_params` and `to_options` directly."""

from __future__ import annotations

import pytest

from shared.errors import InvalidArgument
from shared.sampling_params import SamplingParams, validate_sampling_params

EOS = 2


def validate(params: SamplingParams, num_prompt_tokens: int = 5, max_model_len: int = 128) -> None:
    validate_sampling_params(
        params, vocab_size=260, max_logprobs=20, max_model_len=max_model_len, num_prompt_tokens=num_prompt_tokens
    )


def test_min_tokens_bans_eos_and_stop_token_ids_unless_eos_is_ignored() -> None:
    """vLLM's rule: min_tokens suppresses the stop token ids and EOS; with ignore_eos EOS is not banned
    (it may be sampled, and never stops the request)."""
    params = SamplingParams(min_tokens=3, stop_token_ids=(7,))
    assert params.to_options((EOS,)).banned_token_ids_before_min_tokens == (EOS, 7)
    ignoring = SamplingParams(min_tokens=3, stop_token_ids=(7,), ignore_eos=True)
    assert ignoring.to_options((EOS,)).banned_token_ids_before_min_tokens == (7,)
    assert SamplingParams(stop_token_ids=(7,)).to_options((EOS,)).banned_token_ids_before_min_tokens == ()


def test_a_prompt_that_fills_max_model_len_names_the_prompt_not_max_tokens_0() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate(SamplingParams(max_tokens=4), num_prompt_tokens=128)
    assert str(caught.value) == (
        "the prompt has 128 tokens, which leaves no room for output under max_model_len (128); "
        "shorten the prompt to at most 127 tokens"
    )


def test_min_tokens_beyond_the_room_left_by_the_prompt_is_refused() -> None:
    validate(SamplingParams(min_tokens=123), num_prompt_tokens=5)
    with pytest.raises(InvalidArgument) as caught:
        validate(SamplingParams(min_tokens=124), num_prompt_tokens=5)
    assert str(caught.value) == (
        "min_tokens (124) cannot be reached: the prompt (5 tokens) leaves room for 123 output tokens under "
        "max_model_len (128); lower min_tokens to at most 123"
    )


def test_stop_string_limits() -> None:
    validate(SamplingParams(stop=tuple("x" * 256 if i == 0 else str(i) for i in range(16))))
    with pytest.raises(InvalidArgument, match="17 stop strings given; send at most 16"):
        validate(SamplingParams(stop=tuple(str(i) for i in range(17))))
    with pytest.raises(InvalidArgument, match="a stop string has 257 characters; each may have at most 256"):
        validate(SamplingParams(stop=("x" * 257,)))
