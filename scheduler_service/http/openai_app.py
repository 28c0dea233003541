"""The OpenAI-compatible HTTP API (FastAPI): completions, chat completions, models, health, version, metrics.

Routes only convert: OpenAI JSON -> `RequestIntake` (the same validation and messages as gRPC) ->
the engine's request streams -> OpenAI JSON or server-sent events. A client that goes away, mid-stream
or while waiting for a whole response, aborts its requests, which frees their blocks.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from importlib import metadata
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.exceptions import HTTPException

from scheduler_service.engine import Engine
from scheduler_service.http.auth import require_api_key
from scheduler_service.http.choice_stream import ChoiceOutput, ChoiceStream
from scheduler_service.http.openai_errors import (
    error_body,
    handle_exception,
    handle_http_exception,
    handle_validation_error,
    http_status_of,
)
from scheduler_service.http.openai_params import (
    chat_sampling_params,
    chat_turns,
    completion_prompts,
    completion_sampling_params,
)
from scheduler_service.http.openai_protocol import ChatCompletionRequest, CompletionRequest
from scheduler_service.http.openai_responses import (
    chat_body,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    usage_body,
)
from scheduler_service.http.sse import DONE, AbortingStreamingResponse, sse_event
from scheduler_service.request_intake import RequestIntake
from scheduler_service.request_state import FINISH_ABORT, RequestState, Usage
from scheduler_service.http.lora_routes import lora_router
from scheduler_service.served_model_name import served_model_name
from scheduler_service.tokenizer import Tokenizer
from shared.errors import NotFound, PagewireError, Unavailable
from shared.sampling_params import SamplingParams

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it


def _version() -> str:
    try:
        return metadata.version("pagewire")
    except metadata.PackageNotFoundError:
        return "unknown"


class _ClientDisconnected(Exception):
    pass


async def _until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work` unless the client disconnects first (then cancels it and raises _ClientDisconnected)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise _ClientDisconnected()
    finally:
        task.cancel()
        watcher.cancel()


class OpenAIServing:
    """The handlers, bound to one engine."""

    def __init__(self, engine: Engine, intake: RequestIntake) -> None:
        self.engine = engine
        self.intake = intake
        self.created = int(time.time())

    def model_name(self, requested: str | None) -> str:
        name = served_model_name(self.engine)
        if name is None:
            raise Unavailable("the scheduler is not connected to a ready executor; retry shortly")
        if requested and requested != name and not self._is_adapter(requested):
            raise NotFound(f"The model `{requested}` does not exist.")
        return requested or name

    def _is_adapter(self, name: str) -> bool:
        return self.engine.adapters.enabled and name in self.engine.adapters.registry

    def adapter_of(self, model: str) -> str:
        """The adapter the `model` field selects, as vLLM does: a LoRA adapter's name, else "" (the base)."""
        return model if model != served_model_name(self.engine) and self._is_adapter(model) else ""

    def tokenizer(self) -> Tokenizer:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise Unavailable("the scheduler is not connected to a ready executor; retry shortly")
        return tokenizer

    def submit(
        self, request_id: str, prompts: list[tuple[int, ...]], params: SamplingParams, n: int, model: str
    ) -> ChoiceStream:
        """n requests per prompt, choice `p * n + j` being prompt p's j-th; all or none are queued."""
        states: list[RequestState] = []
        stream = ChoiceStream(self.engine, states)
        try:
            for p, prompt in enumerate(prompts):
                for j in range(n):
                    states.append(self.intake.submit(
                        prompt, params, adapter=self.adapter_of(model), request_id=f"{request_id}-{p * n + j}"
                    ))
        except BaseException:
            stream.close()
            raise
        return stream

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        model = self.model_name(body.model)
        params = completion_sampling_params(body)
        prompts = [
            await self.intake.prompt_from_text_async(p)
            if isinstance(p, str)
            else self.intake.prompt_from_token_ids(p)
            for p in completion_prompts(body)
        ]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = self.submit(request_id, prompts, params, body.n, model)
        tokenizer, with_logprobs = self.tokenizer(), body.logprobs is not None
        head = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model}
        if body.stream:
            return AbortingStreamingResponse(
                self._completion_events(stream, head, len(prompts), tokenizer, with_logprobs, body.include_usage),
                on_close=stream.close,
            )
        outputs = await self._collect(stream, request)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(
            completion_body(request_id, head["created"], model, outputs, len(prompts), tokenizer, with_logprobs)
        )

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        model = self.model_name(body.model)
        params = chat_sampling_params(body)
        prompt = await self.intake.prompt_from_messages_async(chat_turns(body))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = self.submit(request_id, [prompt], params, body.n, model)
        tokenizer, with_logprobs = self.tokenizer(), body.logprobs
        head = {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
        if body.stream:
            return AbortingStreamingResponse(
                self._chat_events(stream, head, tokenizer, with_logprobs, body.include_usage), on_close=stream.close
            )
        outputs = await self._collect(stream, request)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return JSONResponse(chat_body(request_id, head["created"], model, outputs, tokenizer, with_logprobs))

    async def _collect(self, stream: ChoiceStream, request: Request) -> list[ChoiceOutput] | None:
        """Every choice's whole output, or None when the client left first; always aborts what still runs."""
        try:
            outputs = await _until_disconnected(request, stream.collect())
        except _ClientDisconnected:
            return None
        finally:
            stream.close()
        if any(output.finish_reason == FINISH_ABORT for output in outputs):
            raise Unavailable("the server aborted the request (it is shutting down); retry")
        return outputs

    async def _completion_events(
        self, stream: ChoiceStream, head: dict[str, Any], num_prompts: int, tokenizer: Tokenizer,
        with_logprobs: bool, include_usage: bool,
    ) -> AsyncIterator[bytes]:
        usages: list[Usage | None] = [None] * len(stream.states)
        text_offsets = [0] * len(stream.states)
        extra = {"usage": None} if include_usage else {}
        try:
            async for index, delta in stream.deltas():
                if delta.finish_reason is not None:
                    usages[index] = delta.usage
                if not (delta.text or delta.token_ids or delta.finish_reason):
                    continue
                logprobs = None
                if with_logprobs:
                    logprobs = completion_logprobs(
                        tokenizer, delta.token_ids, delta.logprobs, delta.top_logprobs, text_offsets[index]
                    )
                text_offsets[index] += len(delta.text)
                choice = {"index": index, "text": delta.text, "logprobs": logprobs, "finish_reason": delta.finish_reason}
                yield sse_event({**head, "choices": [choice], **extra})
            if include_usage:
                yield sse_event({**head, "choices": [], "usage": usage_body([u for u in usages if u], num_prompts)})
        except PagewireError as error:
            yield _error_event(error)
        yield DONE

    async def _chat_events(
        self, stream: ChoiceStream, head: dict[str, Any], tokenizer: Tokenizer, with_logprobs: bool,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        usages: list[Usage | None] = [None] * len(stream.states)
        extra = {"usage": None} if include_usage else {}
        try:
            for index in range(len(stream.states)):
                role = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                yield sse_event({**head, "choices": [role], **extra})
            async for index, delta in stream.deltas():
                if delta.finish_reason is not None:
                    usages[index] = delta.usage
                if not (delta.text or delta.token_ids or delta.finish_reason):
                    continue
                logprobs = None
                if with_logprobs:
                    logprobs = chat_logprobs(tokenizer, delta.token_ids, delta.logprobs, delta.top_logprobs)
                choice = {
                    "index": index, "delta": {"content": delta.text} if delta.text else {}, "logprobs": logprobs,
                    "finish_reason": delta.finish_reason,
                }
                yield sse_event({**head, "choices": [choice], **extra})
            if include_usage:
                yield sse_event({**head, "choices": [], "usage": usage_body([u for u in usages if u], 1)})
        except PagewireError as error:
            yield _error_event(error)
        yield DONE

    def models(self) -> dict[str, Any]:
        name = self.model_name(None)
        data: dict[str, Any] = {"id": name, "object": "model", "created": self.created, "owned_by": "pagewire"}
        if self.engine.model is not None:
            data["root"] = self.engine.model.model_path
            data["max_model_len"] = self.engine.model.max_model_len
        adapters = self.engine.adapters.adapters() if self.engine.adapters.enabled else []
        loras = [
            {"id": a.name, "object": "model", "created": self.created, "owned_by": "pagewire", "root": a.path,
             "parent": name}
            for a in adapters
        ]
        return {"object": "list", "data": [data, *loras]}


def _error_event(error: BaseException) -> bytes:
    status, error_type, message = http_status_of(error)
    return sse_event(error_body(message, error_type, status))


def create_app(engine: Engine, intake: RequestIntake, registry: CollectorRegistry) -> FastAPI:
    """The app of one scheduler. With `engine.config.api_key` set, every /v1 route needs the key."""
    serving = OpenAIServing(engine, intake)
    app = FastAPI(title="pagewire", version=_version())
    app.add_exception_handler(RequestValidationError, handle_validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, handle_http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(PagewireError, handle_exception)
    app.add_exception_handler(ValueError, handle_exception)
    api_key = engine.config.api_key
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key(api_key))] if api_key else [])

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat_completions(body, request)

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return serving.models()

    v1.include_router(lora_router(engine))
    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        """200 while connected to a ready executor, else 503."""
        if engine.is_ready:
            return Response(status_code=200)
        return JSONResponse(
            error_body("the scheduler is not connected to a ready executor", "ServiceUnavailableError", 503),
            status_code=503,
        )

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
