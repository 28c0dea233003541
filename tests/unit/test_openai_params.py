"""OpenAI request bodies -> SamplingParams, prompts and chat turns: exact values, defaults and refusals."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from scheduler_service.chat_template import ChatTurn
from scheduler_service.http.openai_params import (
    chat_sampling_params,
    chat_turns,
    completion_prompts,
    completion_sampling_params,
)
from scheduler_service.http.openai_protocol import ChatCompletionRequest, CompletionRequest
from shared.errors import InvalidArgument
from shared.sampling_params import SamplingParams


def test_completion_defaults_are_the_grpc_defaults_with_vllms_16_max_tokens() -> None:
    request = CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    assert completion_sampling_params(request) == SamplingParams(max_tokens=16)
    assert SamplingParams().temperature == 1.0  # OpenAI's default


def test_chat_defaults_leave_max_tokens_unset() -> None:
    request = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert chat_sampling_params(request) == SamplingParams()


def test_every_completion_field_maps_exactly() -> None:
    request = CompletionRequest.model_validate({
        "model": "m", "prompt": "hi", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "n": 3, "stop": "\n",
        "seed": 11, "presence_penalty": 0.25, "frequency_penalty": -0.5, "logprobs": 2, "user": "u",
        "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 2, "ignore_eos": True,
        "stop_token_ids": [5, 6], "some_future_field": 1,
    })
    assert completion_sampling_params(request) == SamplingParams(
        temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.25,
        frequency_penalty=-0.5, max_tokens=7, min_tokens=2, stop=("\n",), stop_token_ids=(5, 6), ignore_eos=True,
        seed=11, logprobs=2,
    )
    assert request.n == 3


def test_chat_logprobs_and_max_completion_tokens() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    both = ChatCompletionRequest.model_validate({**base, "max_tokens": 9, "max_completion_tokens": 4, "stop": ["a", "b"]})
    assert chat_sampling_params(both) == SamplingParams(max_tokens=4, stop=("a", "b"))
    old = ChatCompletionRequest.model_validate({**base, "max_tokens": 9})
    assert chat_sampling_params(old).max_tokens == 9
    assert chat_sampling_params(ChatCompletionRequest.model_validate({**base, "logprobs": True})).logprobs == 0
    top = ChatCompletionRequest.model_validate({**base, "logprobs": True, "top_logprobs": 3})
    assert chat_sampling_params(top).logprobs == 3
    with pytest.raises(InvalidArgument, match="top_logprobs needs logprobs"):
        chat_sampling_params(ChatCompletionRequest.model_validate({**base, "top_logprobs": 3}))


def test_prompt_shapes() -> None:
    def prompts(prompt: object) -> list[object]:
        return completion_prompts(CompletionRequest.model_validate({"prompt": prompt}))

    assert prompts("hi") == ["hi"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts([[1, 2], [3]]) == [[1, 2], [3]]
    with pytest.raises(InvalidArgument, match="the prompt is empty"):
        prompts([])


def test_chat_content_parts_are_joined_and_other_parts_refused() -> None:
    request = ChatCompletionRequest.model_validate({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]})
    assert chat_turns(request) == [ChatTurn("system", "be brief"), ChatTurn("user", "a\nb"), ChatTurn("assistant", "")]
    image = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    )
    with pytest.raises(InvalidArgument, match=r"messages\[0\].content has a 'image_url' part"):
        chat_turns(image)


def test_unsupported_fields_are_refused_not_ignored() -> None:
    with pytest.raises(InvalidArgument, match="echo is not supported"):
        completion_sampling_params(CompletionRequest.model_validate({"prompt": "x", "echo": True}))
    with pytest.raises(InvalidArgument, match="logit_bias is not supported"):
        completion_sampling_params(CompletionRequest.model_validate({"prompt": "x", "logit_bias": {"1": 5}}))
    base = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(InvalidArgument, match="tools are not supported"):
        chat_sampling_params(ChatCompletionRequest.model_validate({**base, "tools": [{"type": "function"}]}))
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "x", "n": 0})
