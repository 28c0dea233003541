"""OpenAI response bodies and stream chunks (completions and chat), built from the engine's outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scheduler_service.http.choice_stream import ChoiceOutput
from scheduler_service.request_state import Usage
from scheduler_service.tokenizer import Tokenizer

TopLogprobs = Sequence[tuple[tuple[int, float], ...]]


def usage_body(usages: Sequence[Usage], num_prompts: int) -> dict[str, Any]:
    """Usage of a call whose choices are `usages`, `n = len(usages) / num_prompts` per prompt, in order:
    each prompt counts once (as vLLM), its cached tokens those of its first choice; completions all count."""
    per_prompt = len(usages) // max(num_prompts, 1)
    firsts = usages[::per_prompt] if per_prompt else []
    prompt_tokens = sum(u.prompt_tokens for u in firsts)
    completion_tokens = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": sum(u.cached_prompt_tokens for u in firsts)},
    }


def _token_text(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(
    tokenizer: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[float], top_logprobs: TopLogprobs,
    text_offset: int,
) -> dict[str, Any]:
    """The legacy completions shape: per token its text, logprob, a {text: logprob} of the top N plus
    the chosen token (so up to N + 1 entries, as OpenAI and vLLM), and its offset in the choice's text."""
    tokens = [_token_text(tokenizer, token_id) for token_id in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    tops: list[dict[str, float]] = []
    for i, token in enumerate(tokens):
        # Keys are texts: where two tokens decode alike (e.g. to U+FFFD), the likelier one's logprob stays.
        entry: dict[str, float] = {}
        if i < len(logprobs):
            entry[token] = logprobs[i]
        for candidate, value in top_logprobs[i] if i < len(top_logprobs) else ():
            text = _token_text(tokenizer, candidate)
            entry[text] = max(value, entry.get(text, value))
        tops.append(entry)
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(
    tokenizer: Tokenizer, token_ids: Sequence[int], logprobs: Sequence[float], top_logprobs: TopLogprobs
) -> dict[str, Any]:
    """The chat shape: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`."""

    def entry(token_id: int, value: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    content = []
    for i, token_id in enumerate(token_ids):
        item = entry(token_id, logprobs[i] if i < len(logprobs) else 0.0)
        item["top_logprobs"] = [entry(c, v) for c, v in (top_logprobs[i] if i < len(top_logprobs) else ())]
        content.append(item)
    return {"content": content}


def completion_body(
    request_id: str, created: int, model: str, outputs: Sequence[ChoiceOutput], num_prompts: int,
    tokenizer: Tokenizer, with_logprobs: bool,
) -> dict[str, Any]:
    choices = [
        {
            "index": index,
            "text": output.text,
            "logprobs": completion_logprobs(tokenizer, output.token_ids, output.logprobs, output.top_logprobs, 0)
            if with_logprobs else None,
            "finish_reason": output.finish_reason,
        }
        for index, output in enumerate(outputs)
    ]
    return {
        "id": request_id, "object": "text_completion", "created": created, "model": model, "choices": choices,
        "usage": usage_body([o.usage for o in outputs if o.usage is not None], num_prompts),
    }


def chat_body(
    request_id: str, created: int, model: str, outputs: Sequence[ChoiceOutput], tokenizer: Tokenizer,
    with_logprobs: bool,
) -> dict[str, Any]:
    choices = [
        {
            "index": index,
            "message": {"role": "assistant", "content": output.text},
            "logprobs": chat_logprobs(tokenizer, output.token_ids, output.logprobs, output.top_logprobs)
            if with_logprobs else None,
            "finish_reason": output.finish_reason,
        }
        for index, output in enumerate(outputs)
    ]
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model, "choices": choices,
        "usage": usage_body([o.usage for o in outputs if o.usage is not None], 1),
    }
