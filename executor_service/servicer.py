"""The Executor gRPC servicer: converts protobuf <-> domain types and hands plans to the runner."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog

from executor_service.executor_info import LoadedExecutor
from executor_service.executor_lease import ANONYMOUS_ID, ExecutorLease
from shared.errors import Aborted, FailedPrecondition
from shared.pb.pagewire.v1 import executor_pb2 as pb
from shared.pb.pagewire.v1 import executor_pb2_grpc as pb_grpc
from shared.plan_codec import plan_from_pb, result_to_pb
from shared.scheduler_identity import SCHEDULER_ID_METADATA_KEY
from shared.step_plan import StepError, StepResult

log = structlog.get_logger(__name__)


def describe_to_pb(executor: LoadedExecutor) -> pb.ExecutorDescription:
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
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            max_position_embeddings=info.max_model_len,
            eos_token_ids=config.eos_token_ids,
            dtype=info.dtype,
            fingerprint=info.fingerprint,
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
        max_loras=info.max_loras,
        max_lora_rank=info.max_lora_rank,
        draft_model=None if info.draft_model is None else pb.DraftModelInfo(
            name=info.draft_model.name, path=info.draft_model.path, num_layers=info.draft_model.num_layers,
            max_model_drafts=info.draft_model.max_model_drafts,
        ),
    )


def scheduler_id_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-pagewire-scheduler-id` metadata; the anonymous id when it sent none."""
    for key, value in context.invocation_metadata() or ():
        if key == SCHEDULER_ID_METADATA_KEY:
            return str(value)
    return ANONYMOUS_ID


class ExecutorServicer(pb_grpc.ExecutorServicer):
    """Serves one loaded executor (real or simulated). Before loading finishes every RPC answers UNAVAILABLE.

    Steps run on a single worker thread, so the event loop keeps answering health checks and plans
    execute strictly one after another. One scheduler owns the executor at a time (`ExecutorLease`): a
    Step stream, or a Describe naming another scheduler, is refused with FAILED_PRECONDITION naming the
    owner while its lease holds. The owner's newest stream owns the persistent batch: opening a stream
    resets it, and the owner's older stream's next plan is refused with ABORTED. Draining (`drain`, on
    SIGTERM): open Step streams go on being served, new Describes and Step streams get UNAVAILABLE, and
    `wait_streams_closed` returns once no Step stream is open.
    """

    def __init__(self, lease_seconds: float = 10.0) -> None:
        self.executor: LoadedExecutor | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
        self.lease = ExecutorLease(lease_seconds)
        # Scheduler ids refused under the current owner: a refused scheduler retries often; log it once.
        self._refused: set[str] = set()
        self.is_draining = False
        self._num_streams = 0
        self._no_streams = asyncio.Event()
        self._no_streams.set()

    def attach(self, executor: LoadedExecutor) -> None:
        self.executor = executor

    def drain(self) -> None:
        """Takes no new scheduler: serves the open Step streams until their schedulers close them."""
        self.is_draining = True

    @property
    def num_streams(self) -> int:
        return self._num_streams

    async def wait_streams_closed(self) -> None:
        await self._no_streams.wait()

    async def _refuse_while_draining(self, context: grpc.aio.ServicerContext) -> None:
        if self.is_draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                "the executor is shutting down (SIGTERM): it finishes its running sequences and takes no new scheduler")

    async def _ready(self, context: grpc.aio.ServicerContext) -> LoadedExecutor:
        if self.executor is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the executor is still loading its model")
        assert self.executor is not None
        return self.executor

    async def _check_owner(self, scheduler_id: str, context: grpc.aio.ServicerContext) -> None:
        try:
            self.lease.check(scheduler_id, time.monotonic())
        except FailedPrecondition as error:
            if scheduler_id not in self._refused:
                self._refused.add(scheduler_id)
                log.warning("scheduler_refused", scheduler_id=scheduler_id, peer=context.peer(),
                    reason=str(error))
            await context.abort(error.code, str(error))

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.ExecutorDescription:
        executor = await self._ready(context)
        await self._refuse_while_draining(context)
        scheduler_id = scheduler_id_of(context)
        # A scheduler learns at connect time that it cannot own this executor; a tool may always look.
        if scheduler_id != ANONYMOUS_ID:
            await self._check_owner(scheduler_id, context)
        return describe_to_pb(executor)

    async def Step(
        self, request_iterator: AsyncIterator[pb.StepPlan], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResult]:
        executor = await self._ready(context)
        await self._refuse_while_draining(context)
        scheduler_id = scheduler_id_of(context)
        await self._check_owner(scheduler_id, context)
        if self.lease.owner_id != scheduler_id:
            self._refused.clear()
        epoch = self.lease.open_stream(scheduler_id, time.monotonic())
        loop = asyncio.get_running_loop()
        self._num_streams += 1
        self._no_streams.clear()
        try:
            await loop.run_in_executor(self._worker, executor.runner.reset)
            log.info("step_stream_opened", epoch=epoch, scheduler_id=scheduler_id, peer=context.peer())
            async for message in request_iterator:
                if not self.lease.is_current(epoch):
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
            self._num_streams -= 1
            if self._num_streams == 0:
                self._no_streams.set()
            if self.lease.close_stream(epoch, time.monotonic()):
                await loop.run_in_executor(self._worker, executor.runner.reset)
            log.info("step_stream_closed", epoch=epoch, scheduler_id=scheduler_id)

    async def GetLease(self, request: pb.GetLeaseRequest, context: grpc.aio.ServicerContext) -> pb.LeaseInfo:
        return self._lease_info()

    async def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context: grpc.aio.ServicerContext) -> pb.LeaseInfo:
        scheduler_id = scheduler_id_of(context)
        try:
            self.lease.release(scheduler_id)
        except (Aborted, FailedPrecondition) as error:
            await context.abort(error.code, str(error))
        log.info("lease_released", scheduler_id=scheduler_id)
        return self._lease_info()

    def _lease_info(self) -> pb.LeaseInfo:
        now = time.monotonic()
        holder = self.lease.holder(now)
        return pb.LeaseInfo(owner_id=holder or "", is_free=holder is None,
                            waiting_scheduler_ids=self.lease.waiting(now))

    def close(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
        if self.executor is not None:
            self.executor.close()
