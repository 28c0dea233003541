"""The one place a client's input becomes a validated request: used by the gRPC servicer and the HTTP API.

Every method raises `shared.errors` types with a message saying what to change: Unavailable while no
executor is ready (there is no tokenizer or vocabulary yet), InvalidArgument for a bad prompt or
sampling parameters, NotFound for an unknown adapter, ResourceExhausted when the queue is full.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from scheduler_service.chat_template import ChatTemplate, ChatTurn
from scheduler_service.engine import Engine
from scheduler_service.request_state import RequestState
from scheduler_service.served_model import ServedModel
from scheduler_service.tokenizer import Tokenizer
from shared.errors import InvalidArgument, Unavailable
from shared.request_limits import validate_prompt_bytes, validate_request_fields
from shared.sampling_params import SamplingParams, validate_sampling_params

__all__ = ["ChatTurn", "RequestIntake"]


class RequestIntake:
    """Validates and submits requests to one Engine; raises shared.errors types (InvalidArgument, NotFound,
    Unavailable, ResourceExhausted)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # One Tokenizer per served model; its template is compiled once.
        self._compiled_for: Tokenizer | None = None
        self._chat_template: ChatTemplate | None = None
        self._bytes_per_token_of: Tokenizer | None = None
        self._bytes_per_token = 0

    async def prompt_from_text_async(self, text: str) -> tuple[int, ...]:
        """`prompt_from_text` in a worker thread, after refusing text too long to fit max_model_len
        tokens (so neither tokenizing nor an oversized prompt holds up the event loop)."""
        self._check_prompt_bytes(len(text.encode("utf-8", "surrogatepass")))
        return await asyncio.to_thread(self.prompt_from_text, text)

    async def prompt_from_messages_async(self, messages: Sequence[ChatTurn]) -> tuple[int, ...]:
        """`prompt_from_messages` (template rendering and tokenizing) in a worker thread, after refusing
        messages whose contents alone are too long to fit max_model_len tokens."""
        self._check_prompt_bytes(sum(len(m.content.encode("utf-8", "surrogatepass")) for m in messages))
        self._template()  # compiled here, once, so that worker threads only render
        return await asyncio.to_thread(self.prompt_from_messages, messages)

    def prompt_from_text(self, text: str) -> tuple[int, ...]:
        """The token ids of `text`, with the special tokens HF's `tokenizer(text)` adds."""
        tokenizer = self._ready().tokenizer
        return _non_empty(tuple(tokenizer.encode(text)) if text else ())

    def prompt_from_token_ids(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        """`token_ids` unchanged, once each is checked to lie in the executor's vocabulary."""
        ids = tuple(token_ids)
        vocab_size = self._ready().vocab_size
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise InvalidArgument(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        return _non_empty(ids)

    def prompt_from_messages(self, messages: Sequence[ChatTurn]) -> tuple[int, ...]:
        """The rendered chat (add_generation_prompt=True) tokenized as HF's
        `apply_chat_template(tokenize=True)` does: the template writes BOS and the other control tokens itself, so none are added."""
        tokenizer = self._ready().tokenizer
        return _non_empty(tuple(tokenizer.encode_without_special_tokens(self.render_chat(messages))))

    def render_chat(self, messages: Sequence[ChatTurn]) -> str:
        """HF's `apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`."""
        return self._template().render(messages, add_generation_prompt=True)

    def submit(
        self,
        prompt_token_ids: tuple[int, ...],
        params: SamplingParams,
        *,
        adapter: str = "",
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> RequestState:
        """Checks `params` against the executor's facts and queues the request; the caller must
        `engine.abort(state)` when its client goes away before the request finishes."""
        model = self._ready()
        validate_request_fields(request_id, cache_salt)
        served_adapter = self.engine.adapters.lookup(adapter) if adapter else None
        validate_sampling_params(
            params,
            vocab_size=model.vocab_size,
            max_logprobs=model.max_logprobs,
            max_model_len=model.max_model_len,
            num_prompt_tokens=len(prompt_token_ids),
        )
        prompt = _non_empty(prompt_token_ids)
        return self.engine.add_request(prompt, params, request_id or None, cache_salt or None, served_adapter)

    def _ready(self) -> ServedModel:
        model = self.engine.model
        if not self.engine.is_ready or model is None:
            raise Unavailable("the scheduler is not connected to a ready executor; retry shortly")
        return model

    def _check_prompt_bytes(self, num_bytes: int) -> None:
        model = self._ready()
        tokenizer = model.tokenizer
        if self._bytes_per_token_of is not tokenizer:
            self._bytes_per_token = _longest_entry_bytes(tokenizer)
            self._bytes_per_token_of = tokenizer
        validate_prompt_bytes(num_bytes, model.max_model_len, self._bytes_per_token)

    def _template(self) -> ChatTemplate:
        tokenizer = self._ready().tokenizer
        if self._compiled_for is not tokenizer or self._chat_template is None:
            self._chat_template = ChatTemplate.from_tokenizer(tokenizer)
            self._compiled_for = tokenizer
        return self._chat_template


def _longest_entry_bytes(tokenizer: Tokenizer) -> int:
    """The UTF-8 length of the vocabulary's longest entry: no token covers more input bytes than that
    (byte-level entries spell each byte as one character of 1-2 bytes; "<0x41>"-style entries overcount)."""
    entries = (tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size))
    return max((len(entry.encode("utf-8")) for entry in entries if entry is not None), default=1)


def _non_empty(ids: tuple[int, ...]) -> tuple[int, ...]:
    if not ids:
        raise InvalidArgument("the prompt is empty: set `text`, `token_ids` or `messages`")
    return ids
