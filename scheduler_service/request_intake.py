"""The one place a client's input becomes a validated request: used by the gRPC servicer and the HTTP API.

Every method raises `shared.errors` types with a message saying what to change: Unavailable while no
executor is ready (there is no tokenizer or vocabulary yet), InvalidArgument for a bad prompt or
sampling parameters, NotFound for an unknown adapter, ResourceExhausted when the queue is full.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler_service.chat_template import ChatTemplate, ChatTurn
from scheduler_service.engine import Engine
from scheduler_service.request_state import RequestState
from scheduler_service.served_model import ServedModel
from scheduler_service.tokenizer import Tokenizer
from shared.errors import InvalidArgument, NotFound, Unavailable
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
        if adapter:
            raise NotFound(f"unknown adapter {adapter!r}: no LoRA adapters are loaded")
        validate_sampling_params(
            params,
            vocab_size=model.vocab_size,
            max_logprobs=model.max_logprobs,
            max_model_len=model.max_model_len,
            num_prompt_tokens=len(prompt_token_ids),
        )
        prompt = _non_empty(prompt_token_ids)
        return self.engine.add_request(prompt, params, request_id or None, cache_salt or None)

    def _ready(self) -> ServedModel:
        model = self.engine.model
        if not self.engine.is_ready or model is None:
            raise Unavailable("the scheduler is not connected to a ready executor; retry shortly")
        return model

    def _template(self) -> ChatTemplate:
        tokenizer = self._ready().tokenizer
        if self._compiled_for is not tokenizer or self._chat_template is None:
            self._chat_template = ChatTemplate.from_tokenizer(tokenizer)
            self._compiled_for = tokenizer
        return self._chat_template


def _non_empty(ids: tuple[int, ...]) -> tuple[int, ...]:
    if not ids:
        raise InvalidArgument("the prompt is empty: set `text`, `token_ids` or `messages`")
    return ids
