"""The engine loop of one executor: schedule -> send plan(s) -> receive result -> apply -> stream deltas."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable

import structlog

from scheduler_service.block_pool import BlockPool
from scheduler_service.engine_config import EngineConfig
from scheduler_service.engine_observer import EngineObserver, StepRecord
from scheduler_service.executor_client import ExecutorClient
from scheduler_service.executor_description import ExecutorDescription
from scheduler_service.kv_cache_manager import KVCacheManager
from scheduler_service.request_state import RequestState
from scheduler_service.scheduler import Scheduler, StepRejected
from scheduler_service.scheduler_config import SchedulerConfig
from scheduler_service.sequence import Sequence
from scheduler_service.step_stats import StepStats
from scheduler_service.tokenizer import Tokenizer
from shared.errors import PagewireError, ResourceExhausted, Unavailable
from shared.sampling_params import SamplingParams
from shared.step_plan import SequenceId, StepPlan

log = structlog.get_logger(__name__)

RECONNECT_INTERVAL_SECONDS = 0.5
UNUSABLE_RETRY_SECONDS = 5.0


class Engine:
    """Owns the scheduler and the requests of one executor; all policy runs synchronously in `_step`.

    Only this loop talks to the executor, so plans and results stay strictly ordered; up to
    `max_plans_in_flight` plans are sent ahead of their results. Client calls
    (`add_request`, `abort`) run on the same event loop and only touch synchronous state, then wake
    the loop. When the executor is lost, the engine keeps every request and reconnects; if the executor
    is back within `reconnect_grace_seconds`, running sequences are recomputed there and clients see no
    gap; otherwise live requests fail with UNAVAILABLE.
    """

    def __init__(
        self,
        config: EngineConfig,
        on_ready_change: Callable[[bool], None] = lambda ready: None,
        observer: EngineObserver | None = None,
    ) -> None:
        self.config = config
        self.observer = observer or EngineObserver()
        self.client = ExecutorClient(config.executor_address)
        self.on_ready_change = on_ready_change
        self.description: ExecutorDescription | None = None
        self.tokenizer: Tokenizer | None = None
        self.scheduler: Scheduler | None = None
        self.requests: dict[SequenceId, RequestState] = {}
        self.stats = StepStats()
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lost_since: float | None = None
        self._sent_at: dict[int, float] = {}
        self._last_step_finished = 0.0
        self._connect_attempts = 0
        # Set when the first executor cannot serve these settings: the server exits with it (code 2).
        self.startup_error: ValueError | None = None
        self.failed = asyncio.Event()

    @property
    def is_ready(self) -> bool:
        return self.client.is_connected and self.scheduler is not None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="engine")

    async def stop(self) -> None:
        for request in list(self.requests.values()):
            request.abort()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        await self.client.close()

    def add_request(
        self,
        prompt_token_ids: tuple[int, ...],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
    ) -> RequestState:
        """Queues a validated request; raises Unavailable or ResourceExhausted. Requests share cached
        prefix KV only when their `cache_salt`s are equal."""
        if not self.is_ready:
            raise Unavailable("the scheduler is not connected to a ready executor; retry shortly")
        assert self.scheduler is not None and self.description is not None and self.tokenizer is not None
        if self.scheduler.num_waiting >= self.config.max_queued_requests:
            raise ResourceExhausted(
                f"the queue holds {self.scheduler.num_waiting} requests (--max-queued-requests "
                f"{self.config.max_queued_requests}); retry later"
            )
        sequence_id = SequenceId(next(self._ids))
        request = RequestState(
            request_id=request_id or uuid.uuid4().hex,
            sequence_id=sequence_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            tokenizer=self.tokenizer,
            eos_token_ids=self.description.eos_token_ids,
            max_model_len=self.scheduler.config.max_model_len,
            observer=self.observer,
        )
        self.scheduler.add_sequence(
            Sequence(
                sequence_id=sequence_id,
                prompt_token_ids=prompt_token_ids,
                arrival_index=sequence_id,
                sampling=params.to_options(self.description.eos_token_ids),
                cache_salt=cache_salt,
                max_num_tokens=None if params.max_tokens is None else len(prompt_token_ids) + params.max_tokens,
            )
        )
        self.requests[sequence_id] = request
        self._wake.set()
        return request

    def abort(self, request: RequestState) -> None:
        """Ends a request the client gave up on; its blocks are freed now, the executor told next step."""
        if self.requests.pop(request.sequence_id, None) is not None and self.scheduler is not None:
            self.scheduler.abort_sequence(request.sequence_id)
            request.abort()
            self._wake.set()
            log.info("request_aborted", request_id=request.request_id)

    async def _run(self) -> None:
        while self.startup_error is None:
            try:
                if not self.client.is_connected:
                    await self._connect()
                elif self.scheduler is None or not (self.scheduler.has_work or self.scheduler.num_in_flight):
                    await self._idle()
                else:
                    await self._step()
            except Unavailable as error:
                self._on_executor_lost(str(error))
            except Exception as error:  # the loop must outlive a bug; clients must not hang
                log.exception("engine_step_failed")
                self._fail_live_requests(PagewireError(f"internal error in the engine: {error!r}"))
                await self.client.close()
                self._on_executor_lost("engine error")

    async def _idle(self) -> None:
        """Waits for work, or for the executor's stream to end (noticed even with no request running)."""
        self._wake.clear()
        woken = asyncio.ensure_future(self._wake.wait())
        closed = asyncio.ensure_future(self.client.wait_closed())
        done, pending = await asyncio.wait({woken, closed}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if closed in done:
            await self.client.close()
            raise Unavailable(f"executor {self.client.address} closed the step stream")

    def _on_executor_lost(self, reason: str) -> None:
        log.warning("executor_lost", reason=reason)
        if self._lost_since is None:
            self._lost_since = time.monotonic()
        self.on_ready_change(False)

    async def _connect(self) -> None:
        self._connect_attempts += 1
        try:
            description = await self.client.connect()
        except Unavailable as error:
            log.info(
                "executor_connect_retry", address=self.client.address, attempt=self._connect_attempts,
                reason=str(error), retry_in_seconds=RECONNECT_INTERVAL_SECONDS,
            )
            self._fail_live_requests_after_grace()
            await asyncio.sleep(RECONNECT_INTERVAL_SECONDS)
            return
        try:
            self._prepare(description)
        except ValueError as error:
            # The executor cannot serve these settings (e.g. its KV pool is smaller than max_model_len).
            await self.client.close()
            if self.description is None:
                # The first executor: a setting that can never work here; fail at start-up, not in a loop.
                log.error("executor_unusable", address=self.client.address, reason=str(error), fatal=True)
                self.startup_error = ValueError(f"the executor at {self.client.address} cannot serve: {error}")
                self.failed.set()
                return
            log.error(
                "executor_unusable", address=self.client.address, reason=str(error),
                retry_in_seconds=UNUSABLE_RETRY_SECONDS,
            )
            self._fail_live_requests(Unavailable(f"the executor cannot serve: {error}"))
            await asyncio.sleep(UNUSABLE_RETRY_SECONDS)
            return
        self.description = description
        self._lost_since = None
        self._connect_attempts = 0
        self.on_ready_change(True)
        self._wake.set()
        log.info(
            "executor_connected", address=self.client.address, model=description.model_name,
            device=description.device, num_device_blocks=description.num_device_blocks,
        )

    def _prepare(self, description: ExecutorDescription) -> None:
        """Keeps the scheduler for the same executor geometry (recomputing what ran, costing preemptions
        with the speeds the executor measured this time), else rebuilds it."""
        self._sent_at.clear()
        if self.scheduler is not None and self.description is not None and (
            self.description.same_cache_geometry(description)
        ):
            self.scheduler.reset_executor_state()
            self.scheduler.use_transfer_speeds(description.transfer_speeds)
        else:
            self._fail_live_requests(Unavailable("the executor changed; resend the request"))
            self._build(description)

    def _build(self, description: ExecutorDescription) -> None:
        config = self.config
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            requested, limit = getattr(config, name), getattr(description, name)
            if requested is not None and limit < requested:
                log.warning(
                    "executor_limit_lowers_setting", setting=name, requested=requested, executor_limit=limit,
                    fix=f"start the executor with --{name.replace('_', '-')} {requested}"
                    if name != "max_model_len" else "the model is shorter than --max-model-len",
                )
        max_model_len = min(config.max_model_len or description.max_model_len, description.max_model_len)
        scheduler_config = SchedulerConfig(
            max_num_seqs=min(config.max_num_seqs, description.max_num_seqs),
            max_num_batched_tokens=min(config.max_num_batched_tokens, description.max_num_batched_tokens),
            max_model_len=max_model_len,
            block_size=description.block_size,
            num_device_blocks=description.num_device_blocks,
            num_host_blocks=description.num_host_blocks,
            preemption_mode=config.preemption_mode,
            transfer_speeds=description.transfer_speeds,
        )
        pool = BlockPool(description.num_device_blocks)
        kv_cache_manager = KVCacheManager(pool, description.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, kv_cache_manager)
        self.tokenizer = Tokenizer.from_model_path(config.tokenizer_dir or description.model_path)

    def _fail_live_requests_after_grace(self) -> None:
        if self._lost_since is not None and time.monotonic() - self._lost_since > self.config.reconnect_grace_seconds:
            self._fail_live_requests(Unavailable(f"the executor {self.client.address} is unreachable"))
            self._lost_since = None

    def _fail_live_requests(self, error: PagewireError) -> None:
        for sequence_id, request in list(self.requests.items()):
            if self.scheduler is not None:
                self.scheduler.abort_sequence(sequence_id)
            request.fail(error)
        self.requests.clear()

    async def _step(self) -> None:
        """One iteration: fill the pipeline up to `max_plans_in_flight` plans, then await, apply and
        stream the oldest result. Everything but the awaited executor calls is synchronous policy code;
        results come back, and are applied, in the order their plans were sent."""
        scheduler = self.scheduler
        assert scheduler is not None
        started = time.perf_counter()
        while scheduler.num_in_flight < self.config.max_plans_in_flight:
            plan = scheduler.schedule()
            if plan is None:
                break
            self._sent_at[plan.step_id] = time.perf_counter()
            await self.client.send(plan)
            self._mark_scheduled(plan)
        if scheduler.num_in_flight == 0:
            return
        scheduled = time.perf_counter()
        result = await self.client.receive()
        received = time.perf_counter()
        sent_at = self._sent_at.pop(result.step_id, started)
        try:
            outputs = scheduler.apply_result(result)
        except StepRejected as error:
            # Our view of the executor is wrong: start over on a fresh stream (recompute everything).
            log.error("step_rejected", error=str(error))
            await self.client.close()
            return
        for output in outputs:
            request = self.requests.get(output.sequence_id)
            seq = scheduler.get_sequence(output.sequence_id)
            if request is not None and seq is not None:
                request.num_cached_prompt_tokens = seq.num_cached_prompt_tokens or 0
            if request is not None and request.on_output(output):
                del self.requests[output.sequence_id]
                scheduler.finish_sequence(output.sequence_id)
        finished = time.perf_counter()
        # A step's wall time runs from when the executor could start on it (its plan sent, or the
        # previous result handled, whichever is later) to its result handled: with plans in flight
        # the per-step times still add up to the elapsed time.
        wall_seconds = finished - max(sent_at, self._last_step_finished)
        self.stats.record(
            wall_seconds=wall_seconds,
            scheduler_seconds=(scheduled - started) + (finished - received),
            forward_seconds=result.timing.forward_seconds,
            num_tokens=result.timing.num_tokens,
        )
        self._last_step_finished = finished
        self.observer.on_step(
            StepRecord(
                wall_seconds=wall_seconds,
                executor_seconds=result.timing.total_seconds,
                forward_seconds=result.timing.forward_seconds,
                num_tokens=result.timing.num_tokens,
            )
        )

    def _mark_scheduled(self, plan: StepPlan) -> None:
        """Notes when each request first entered a plan (the end of its time queued)."""
        now = time.monotonic()
        for new in plan.new_sequences:
            request = self.requests.get(SequenceId(new.sequence_id))
            if request is not None:
                request.timeline.mark_scheduled(now)
