"""The public Generation servicer: protobuf <-> domain conversion and request validation, nothing more."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from scheduler_service.engine import Engine
from scheduler_service.request_state import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, RequestDelta
from shared.errors import InvalidArgument, NotFound, Unavailable
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from shared.sampling_params import SamplingParams, validate_sampling_params

_FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    FINISH_STOP: pb.FINISH_REASON_STOP,
    FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    FINISH_ABORT: pb.FINISH_REASON_ABORT,
}


def sampling_params_from_pb(message: pb.SamplingParams) -> SamplingParams:
    """Unset optional fields take the documented defaults."""

    def opt(name: str, default: float | int | None) -> float | int | None:
        return getattr(message, name) if message.HasField(name) else default

    return SamplingParams(
        temperature=opt("temperature", 1.0),
        top_p=opt("top_p", 1.0),
        top_k=opt("top_k", -1),
        min_p=opt("min_p", 0.0),
        repetition_penalty=opt("repetition_penalty", 1.0),
        presence_penalty=opt("presence_penalty", 0.0),
        frequency_penalty=opt("frequency_penalty", 0.0),
        max_tokens=opt("max_tokens", None),
        min_tokens=message.min_tokens,
        stop=tuple(message.stop),
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        seed=opt("seed", None),
        logprobs=opt("logprobs", None),
    )


def delta_to_pb(request_id: str, delta: RequestDelta) -> pb.GenerateResponse:
    response = pb.GenerateResponse(
        request_id=request_id,
        token_ids=delta.token_ids,
        text=delta.text,
        logprobs=delta.logprobs,
        finish_reason=_FINISH_REASONS[delta.finish_reason],
    )
    if delta.usage is not None:
        response.usage.prompt_tokens = delta.usage.prompt_tokens
        response.usage.completion_tokens = delta.usage.completion_tokens
        response.usage.cached_prompt_tokens = delta.usage.cached_prompt_tokens
    return response


class GenerationServicer(pb_grpc.GenerationServicer):
    """Validates requests against the executor's facts, hands them to the engine and streams deltas."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _prompt_token_ids(self, request: pb.GenerateRequest) -> tuple[int, ...]:
        engine = self.engine
        assert engine.tokenizer is not None and engine.description is not None
        kind = request.WhichOneof("input")
        if kind == "text":
            ids = tuple(engine.tokenizer.encode(request.text)) if request.text else ()
        elif kind == "token_ids":
            ids = tuple(request.token_ids.ids)
            vocab_size = engine.description.vocab_size
            bad = [i for i in ids if not 0 <= i < vocab_size]
            if bad:
                raise InvalidArgument(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
        else:
            ids = ()
        if not ids:
            raise InvalidArgument("the prompt is empty: set `text` or `token_ids`")
        return ids

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = self.engine
        if not engine.is_ready:
            raise Unavailable("the scheduler is not connected to a ready executor; retry shortly")
        if request.adapter:
            raise NotFound(f"unknown adapter {request.adapter!r}: no LoRA adapters are loaded")
        prompt = self._prompt_token_ids(request)
        params = sampling_params_from_pb(request.sampling)
        assert engine.description is not None and engine.scheduler is not None
        validate_sampling_params(
            params,
            vocab_size=engine.description.vocab_size,
            max_logprobs=engine.description.max_logprobs,
            max_model_len=engine.scheduler.config.max_model_len,
            num_prompt_tokens=len(prompt),
        )
        state = engine.add_request(prompt, params, request.request_id or None, request.cache_salt or None)
        try:
            while True:
                delta = await state.deltas.get()
                if isinstance(delta, BaseException):
                    raise delta
                yield delta_to_pb(state.request_id, delta)
                if delta.finish_reason is not None:
                    return
        finally:
            # Cancelled, deadline passed or failed mid-stream: free the request's blocks now.
            engine.abort(state)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        engine = self.engine
        info = pb.ServerInfo(executor_ready=engine.is_ready)
        description, scheduler = engine.description, engine.scheduler
        if description is not None and scheduler is not None:
            pool = scheduler.kv_cache_manager.block_pool
            counters = scheduler.counters
            info.model_name = description.model_name
            info.max_model_len = scheduler.config.max_model_len
            info.block_size = description.block_size
            info.num_device_blocks = description.num_device_blocks
            info.num_free_device_blocks = pool.num_free_blocks
            info.num_host_blocks = description.num_host_blocks
            info.num_running = scheduler.num_running
            info.num_waiting = scheduler.num_waiting
            info.num_preemptions = counters.num_preemptions
            info.num_prompt_tokens_computed = counters.num_prompt_tokens_computed
            info.num_prompt_tokens_cached = counters.num_prompt_tokens_cached
            info.num_cached_device_blocks = pool.num_cached_blocks
            info.num_free_cached_device_blocks = pool.num_free_cached_blocks()
            info.num_free_host_blocks = scheduler.swap_space.num_free_blocks
            info.num_swapped = scheduler.num_swapped
            info.num_preemptions_recompute = counters.num_preemptions_recompute
            info.num_preemptions_swap = counters.num_preemptions_swap
            info.num_blocks_swapped_out = counters.num_blocks_swapped_out
            info.num_blocks_swapped_in = counters.num_blocks_swapped_in
            info.num_tokens_recomputed = counters.num_tokens_recomputed
            info.vocab_size = description.vocab_size
            info.executor_device = description.device
        return info
