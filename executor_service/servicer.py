"""The Executor gRPC servicer: converts protobuf <-> domain types and hands plans to the runner."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
import torch

from executor_service.executor import Executor
from shared.pb.pagewire.v1 import executor_pb2 as pb
from shared.pb.pagewire.v1 import executor_pb2_grpc as pb_grpc
from shared.plan_codec import plan_from_pb, result_to_pb
from shared.step_plan import StepError, StepResult

log = structlog.get_logger(__name__)


def describe_to_pb(executor: Executor) -> pb.ExecutorDescription:
    info = executor.info
    config = info.model_config
    return pb.ExecutorDescription(
        model=pb.ModelInfo(
            name=config.name,
            path=info.model_dir,
            architecture=config.architecture,
            num_layers=config.num_layers,
            num_attention_heads=config.num_attention_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
            max_position_embeddings=info.max_model_len,
            eos_token_ids=config.eos_token_ids,
            dtype=str(info.dtype).removeprefix("torch."),
        ),
        cache=pb.CacheInfo(
            block_size=info.block_size,
            num_device_blocks=info.num_device_blocks,
            num_host_blocks=info.num_host_blocks,
            bytes_per_block=info.bytes_per_block,
        ),
        speeds=pb.MeasuredSpeeds(
            swap_out_bytes_per_second=info.speeds.swap_out_bytes_per_second,
            swap_in_bytes_per_second=info.speeds.swap_in_bytes_per_second,
            prefill_tokens_per_second=info.speeds.prefill_tokens_per_second,
        ),
        device=info.device_name,
        ops_backend=info.ops_backend,
        max_num_batched_tokens=info.max_num_batched_tokens,
        max_num_seqs=info.max_num_seqs,
        max_logprobs=info.max_logprobs,
    )


class ExecutorServicer(pb_grpc.ExecutorServicer):
    """Serves one loaded executor. Before loading finishes every RPC answers UNAVAILABLE.

    Steps run on a single worker thread, so the event loop keeps answering health checks and plans
    execute strictly one after another. Only the newest Step stream owns the persistent batch: opening a
    stream resets it, and an older stream's next plan is refused with ABORTED.
    """

    def __init__(self) -> None:
        self.executor: Executor | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
        self._stream_epoch = 0

    def attach(self, executor: Executor) -> None:
        self.executor = executor

    async def _ready(self, context: grpc.aio.ServicerContext) -> Executor:
        if self.executor is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the executor is still loading its model")
        assert self.executor is not None
        return self.executor

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.ExecutorDescription:
        return describe_to_pb(await self._ready(context))

    async def Step(
        self, request_iterator: AsyncIterator[pb.StepPlan], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResult]:
        executor = await self._ready(context)
        loop = asyncio.get_running_loop()
        self._stream_epoch += 1
        epoch = self._stream_epoch
        await loop.run_in_executor(self._worker, executor.runner.reset)
        log.info("step_stream_opened", epoch=epoch, peer=context.peer())
        try:
            async for message in request_iterator:
                if epoch != self._stream_epoch:
                    await context.abort(grpc.StatusCode.ABORTED, "a newer Step stream took over this executor")
                try:
                    plan = plan_from_pb(message)
                except ValueError as error:
                    code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                    yield result_to_pb(StepResult(step_id=message.step_id, error=StepError(code, str(error))))
                    continue
                result = await loop.run_in_executor(self._worker, executor.runner.execute, plan)
                yield result_to_pb(result)
        finally:
            if epoch == self._stream_epoch:
                await loop.run_in_executor(self._worker, executor.runner.reset)
            log.info("step_stream_closed", epoch=epoch)

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
