"""The public Generation servicer: protobuf <-> domain conversion, nothing more (RequestIntake validates)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from scheduler_service.engine import Engine
from scheduler_service.lora.adapter_registry import Adapter
from scheduler_service.replica_status import ReplicaStatus
from scheduler_service.request_intake import ChatTurn, RequestIntake
from scheduler_service.request_state import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, RequestDelta
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from shared.sampling_params import SamplingParams

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
        speculative=opt("speculative", True),
    )


def chat_turns_from_pb(messages: pb.ChatMessages) -> tuple[ChatTurn, ...]:
    return tuple(ChatTurn(role=message.role, content=message.content) for message in messages.messages)


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
    """Converts requests to the domain, hands them to `RequestIntake` and streams deltas back."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.intake = RequestIntake(engine)

    async def _prompt_token_ids(self, request: pb.GenerateRequest) -> tuple[int, ...]:
        """Text and messages are length-checked, then rendered and tokenized off the event loop."""
        intake = self.intake
        kind = request.WhichOneof("input")
        if kind == "text":
            return await intake.prompt_from_text_async(request.text)
        if kind == "token_ids":
            return intake.prompt_from_token_ids(request.token_ids.ids)
        if kind == "messages":
            return await intake.prompt_from_messages_async(chat_turns_from_pb(request.messages))
        return intake.prompt_from_token_ids(())

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = self.engine
        prompt = await self._prompt_token_ids(request)
        state = self.intake.submit(
            prompt,
            sampling_params_from_pb(request.sampling),
            adapter=request.adapter,
            request_id=request.request_id or None,
            cache_salt=request.cache_salt or None,
        )
        try:
            while True:
                delta = await state.next_delta()
                yield delta_to_pb(state.request_id, delta)
                if delta.finish_reason is not None:
                    return
        finally:
            # Cancelled, deadline passed or failed mid-stream: free the request's blocks now.
            engine.abort(state)

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext) -> pb.ServerInfo:
        engine = self.engine
        info = pb.ServerInfo(executor_ready=engine.is_ready)
        model, total = engine.model, engine.totals()
        info.executors.extend(executor_status_to_pb(status) for status in engine.statuses())
        if model is None:
            return info
        counters = total.counters
        info.model_name = model.model_name
        info.max_model_len = model.max_model_len
        info.vocab_size = model.vocab_size
        info.block_size = total.block_size
        info.executor_device = total.device
        info.num_device_blocks = total.num_device_blocks
        info.num_free_device_blocks = total.num_free_device_blocks
        info.num_host_blocks = total.num_host_blocks
        info.num_running = total.num_running
        info.num_waiting = total.num_waiting
        info.num_preemptions = counters.num_preemptions
        info.num_prompt_tokens_computed = counters.num_prompt_tokens_computed
        info.num_prompt_tokens_cached = counters.num_prompt_tokens_cached
        info.num_cached_device_blocks = total.num_cached_device_blocks
        info.num_free_cached_device_blocks = total.num_free_cached_device_blocks
        info.num_free_host_blocks = total.num_free_host_blocks
        info.num_swapped = total.num_swapped
        info.num_preemptions_recompute = counters.num_preemptions_recompute
        info.num_preemptions_swap = counters.num_preemptions_swap
        info.num_blocks_swapped_out = counters.num_blocks_swapped_out
        info.num_blocks_swapped_in = counters.num_blocks_swapped_in
        info.num_tokens_recomputed = counters.num_tokens_recomputed
        info.num_drafts = counters.num_drafts
        info.num_draft_tokens = counters.num_draft_tokens
        info.num_accepted_draft_tokens = counters.num_accepted_draft_tokens
        info.num_accepted_per_position.extend(counters.num_accepted_per_position)
        return info

    async def DrainExecutor(
        self, request: pb.DrainExecutorRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecutorStatus:
        return executor_status_to_pb(self.engine.drain(request.address))

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> pb.AdapterInfo:
        return self._adapter_info(await self.engine.adapters.load(request.name, request.path))

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.AdapterInfo:
        return self._adapter_info(self.engine.adapters.unregister(request.name))

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        adapters = self.engine.adapters.adapters() if self.engine.adapters.enabled else []
        return pb.ListAdaptersResponse(adapters=[self._adapter_info(adapter) for adapter in adapters])

    def _adapter_info(self, adapter: Adapter) -> pb.AdapterInfo:
        num_requests, is_loaded_on_device = self.engine.adapter_usage(adapter)
        spec = adapter.spec
        return pb.AdapterInfo(
            name=adapter.name, path=adapter.path, rank=spec.rank, target_modules=sorted(spec.target_modules),
            is_loaded_on_device=is_loaded_on_device, scaling=spec.scaling, num_requests=num_requests,
        )


def executor_status_to_pb(status: ReplicaStatus) -> pb.ExecutorStatus:
    return pb.ExecutorStatus(
        address=status.address,
        ready=status.is_ready and not status.is_draining,
        draining=status.is_draining,
        device=status.device,
        num_running=status.num_running,
        num_waiting=status.num_waiting,
        num_device_blocks=status.num_device_blocks,
        num_free_device_blocks=status.num_free_device_blocks,
        num_prompt_tokens_cached=status.counters.num_prompt_tokens_cached,
        num_requests_placed=status.num_requests_placed,
    )
