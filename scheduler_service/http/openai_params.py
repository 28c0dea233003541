"""OpenAI request bodies -> the engine's inputs: SamplingParams, prompts, chat turns.

Values left unset take `SamplingParams`' defaults, the same as the gRPC API's (temperature 1.0, as
OpenAI's). `max_tokens`: vLLM's behaviour, 16 by default for completions, unset for chat (then up to
`max_model_len`). Known OpenAI fields this server cannot honour raise InvalidArgument rather than
being ignored.
"""

from __future__ import annotations

from typing import Any

from scheduler_service.chat_template import ChatTurn
from scheduler_service.http.openai_protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from shared.errors import InvalidArgument
from shared.sampling_params import SamplingParams


def _sampling_params(request: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    if request.logit_bias:
        raise InvalidArgument("logit_bias is not supported; leave it out")
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    values: dict[str, Any] = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "max_tokens": max_tokens,
        "min_tokens": request.min_tokens,
        "stop": stop,
        "stop_token_ids": tuple(request.stop_token_ids or ()),
        "ignore_eos": request.ignore_eos,
        "seed": request.seed,
        "logprobs": logprobs,
    }
    return SamplingParams(**{name: value for name, value in values.items() if value is not None})


def completion_sampling_params(request: CompletionRequest) -> SamplingParams:
    if request.echo:
        raise InvalidArgument("echo is not supported; leave it out or set it to false")
    if request.suffix:
        raise InvalidArgument("suffix is not supported; leave it out")
    if request.best_of is not None and request.best_of != request.n:
        raise InvalidArgument(f"best_of must equal n ({request.n}) when set, got {request.best_of}")
    return _sampling_params(request, request.max_tokens, request.logprobs)


def chat_sampling_params(request: ChatCompletionRequest) -> SamplingParams:
    if request.tools:
        raise InvalidArgument("tools are not supported; leave them out")
    if request.response_format is not None and request.response_format.get("type", "text") != "text":
        raise InvalidArgument(f"response_format {request.response_format.get('type')!r} is not supported; use text")
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs: set logprobs to true")
    max_tokens = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    return _sampling_params(request, max_tokens, logprobs)


def completion_prompts(request: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request, each a string or a list of token ids, in request order."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(item, int) for item in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    if not prompt:
        raise InvalidArgument("the prompt is empty: set `prompt` to a string, strings or token ids")
    return list(prompt)  # type: ignore[arg-type]


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise InvalidArgument(
                f"messages[{index}].content has a {part.type!r} part; only {{\"type\": \"text\", \"text\": ...}} "
                "parts are supported"
            )
        texts.append(part.text)
    return "\n".join(texts)


def chat_turns(request: ChatCompletionRequest) -> list[ChatTurn]:
    """The messages as the chat template sees them; text parts of a content list are joined with newlines (as vLLM does)."""
    if not request.messages:
        raise InvalidArgument("messages is empty: send at least one message")
    return [ChatTurn(role=message.role, content=_message_text(message, i)) for i, message in enumerate(request.messages)]
