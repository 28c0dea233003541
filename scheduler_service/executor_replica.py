"""One executor as its scheduler drives it: stream, scheduler (block pool, prefix cache, swap space,
speeds), plans in flight and the engine loop, swapped in as one object."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

import structlog

from scheduler_service.background_task import cancel_and_wait
from scheduler_service.block_pool import BlockPool
from scheduler_service.engine_config import EngineConfig
from scheduler_service.engine_observer import EngineObserver, StepRecord
from scheduler_service.executor_channel import ExecutorChannel
from scheduler_service.executor_client import ExecutorClient
from scheduler_service.executor_description import ExecutorDescription
from scheduler_service.executor_health_watch import ExecutorHealthWatch
from scheduler_service.executor_lease_client import ExecutorLeaseClient
from scheduler_service.kv_cache_manager import KVCacheManager
from scheduler_service.lora.adapter_registry import Adapter
from scheduler_service.replica_status import ReplicaStatus
from scheduler_service.scheduler import Scheduler, StepRejected
from scheduler_service.scheduler_config import SchedulerConfig
from scheduler_service.speculative.draft_proposer import proposer_from
from scheduler_service.sequence import Sequence
from scheduler_service.step_stats import StepStats
from shared.errors import PagewireError, Unauthenticated, Unavailable
from shared.step_plan import SequenceId, SequenceOutput, StepPlan

log = structlog.get_logger(__name__)

RECONNECT_INTERVAL_SECONDS = 0.5
UNUSABLE_RETRY_SECONDS = 5.0
# After giving an executor up to a waiting scheduler, this long before asking for it again (several of
# that scheduler's retries, so it takes the executor first).
YIELD_BACKOFF_SECONDS = 3.0


class ReplicaOwner(Protocol):
    """What a replica tells the engine that coordinates the replicas (all on one event loop)."""

    # How to reach the executors, read once at start-up and shared by every replica.
    executor_channel: ExecutorChannel

    def accept(self, replica: ExecutorReplica, description: ExecutorDescription) -> None:
        """Raises ValueError when the executor serves another model than the others."""

    def on_unusable(self, replica: ExecutorReplica, error: ValueError) -> bool:
        """The executor cannot serve; True when that is fatal (the replica then stops trying)."""

    def on_ready(self, replica: ExecutorReplica) -> None: ...

    def on_lost(self, replica: ExecutorReplica, sequences: list[Sequence]) -> None:
        """The executor is gone; `sequences` (evacuated, keeping their outputs) need another home."""

    def on_failed(self, replica: ExecutorReplica, sequence_ids: list[SequenceId], error: PagewireError) -> None:
        """These sequences' requests fail with `error` (a bug in the engine loop)."""

    def on_outputs(self, replica: ExecutorReplica, outputs: list[SequenceOutput]) -> None:
        """Sampled tokens to stream; the owner calls `replica.scheduler.finish_sequence` for those that end."""

    def on_scheduled(self, replica: ExecutorReplica, plan: StepPlan) -> None:
        """`plan` was sent: its new sequences' time queued ends."""

    def on_drained(self, replica: ExecutorReplica) -> None: ...

    def on_adapter_unreadable(self, replica: ExecutorReplica, adapter: Adapter, reason: str) -> None:
        """The executor could not read `adapter`'s files: its requests must fail, the stream restarts."""

    def on_leaving(self, replica: ExecutorReplica) -> None:
        """The executor is shutting down (or was given up): it takes no new work."""

    def on_waiting_schedulers(self, replica: ExecutorReplica) -> None:
        """Other schedulers ask for this executor (`replica.waiting_schedulers`): called on every lease
        poll while some do, and when the last stops, so the owner can re-check its share each time."""

    def may_take(self, replica: ExecutorReplica) -> bool:
        """Whether this scheduler may take one more executor now (not while it holds its fair share and
        other schedulers wait for one)."""


class ExecutorReplica:
    """A data-parallel executor: its own Step stream, scheduler, speeds and loop.

    Only this replica's loop talks to its executor, so plans and results stay strictly ordered; up to
    `max_plans_in_flight` plans are sent ahead of their results. The owner adds sequences with
    `add_sequence` (same event loop, synchronous), which wakes the loop. When the executor is lost, its
    sequences are evacuated to the owner at once (to be recomputed elsewhere, or here once it is back)
    and the replica reconnects. Draining (`drain`, the admin RPC): nothing new is placed here
    (`accepts_work` is False), the live sequences finish, then the stream is closed and the replica
    stops for good. Leaving (the executor's health turned NOT_SERVING, e.g. its SIGTERM drain): nothing
    new is placed here; the live sequences finish, then the stream is closed (so the executor can exit)
    and the replica reconnects as to a lost executor: an executor started again at the address, or one
    that says SERVING again, receives work.
    """

    def __init__(self, address: str, config: EngineConfig, owner: ReplicaOwner, observer: EngineObserver) -> None:
        self.address = address
        self.config = config
        self.owner = owner
        self.observer = observer
        channel = owner.executor_channel
        self.client = ExecutorClient(address, config.scheduler_id, config.executor_token, channel)
        self.description: ExecutorDescription | None = None
        self.scheduler: Scheduler | None = None
        self.stats = StepStats()
        self.num_requests_placed = 0
        self.is_draining = False
        # The executor's health said NOT_SERVING (it is shutting down): no new work until it reconnects.
        self.is_leaving = False
        self.is_stopped = False
        self.health_watch = ExecutorHealthWatch(address, self._on_health, channel)
        self.lease_client = ExecutorLeaseClient(self.health_watch, self.client.metadata, self._on_lease)
        # Other schedulers' ids that asked this executor for its lease lately (GetLease), while connected.
        self.waiting_schedulers: tuple[str, ...] = ()
        # Giving the executor up to a waiting scheduler: like a drain, then ReleaseLease and a pause.
        self.is_yielding = False
        self._retry_at = 0.0
        self._is_ready = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sent_at: dict[int, float] = {}
        self._last_step_finished = 0.0
        self._connect_attempts = 0
        self._expected_hits: dict[SequenceId, int] = {}
        self._connected_at = 0.0

    @property
    def is_ready(self) -> bool:
        """Described and connected: set on connect, cleared (and its sequences evacuated) on loss."""
        return self._is_ready and self.scheduler is not None

    @property
    def accepts_work(self) -> bool:
        return self.is_ready and not self.is_draining and not self.is_leaving and not self.is_yielding

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"executor {self.address}")
        self.health_watch.start()
        self.lease_client.start()

    async def stop(self) -> None:
        self.is_stopped = True
        if self._task is not asyncio.current_task():
            await cancel_and_wait(self._task)
        # The loop (which asks for and releases the lease) is done before the shared channel closes.
        await self.lease_client.stop()
        await self.health_watch.stop()
        await self.client.close()

    def add_sequence(self, seq: Sequence, num_cached_tokens: int = 0) -> None:
        """Queue `seq` here (a new one, or one evacuated from a lost executor); only while `accepts_work`.
        `num_cached_tokens`: what the prefix cache holds of it now, for `num_load_tokens`."""
        assert self.accepts_work and self.scheduler is not None, f"executor {self.address} takes no work"
        self.scheduler.add_sequence(seq)
        self._expected_hits[seq.sequence_id] = num_cached_tokens
        self.num_requests_placed += 1
        self._wake.set()

    def finish_sequence(self, sequence_id: SequenceId) -> None:
        assert self.scheduler is not None
        self.scheduler.finish_sequence(sequence_id)
        self._expected_hits.pop(sequence_id, None)

    def abort_sequence(self, sequence_id: SequenceId) -> None:
        self._expected_hits.pop(sequence_id, None)
        if self.scheduler is not None and self.scheduler.abort_sequence(sequence_id):
            self._wake.set()

    def num_load_tokens(self) -> int:
        """The work placed here, for placement: tokens in used device blocks (a shared prefix block
        counts once) plus, per waiting sequence, the tokens its prefix-cache hit will not supply."""
        assert self.scheduler is not None
        kv = self.scheduler.kv_cache_manager
        num_waiting_tokens = sum(
            seq.num_tokens - min(seq.num_tokens, self._expected_hits.get(seq.sequence_id, 0))
            for seq in self.scheduler.waiting
        )
        return kv.block_pool.num_used_blocks * kv.block_size + num_waiting_tokens

    def drain(self) -> None:
        """Place nothing new here; close the stream once every live sequence finished."""
        if not self.is_draining:
            log.info("executor_draining", address=self.address)
        self.is_draining = True
        self._wake.set()

    def give_up(self) -> None:
        """Place nothing new here; once every live sequence finished, close the stream, release the lease
        and ask for the executor again only after `YIELD_BACKOFF_SECONDS` (by then another scheduler
        that waited for it has it)."""
        if not self.is_yielding:
            log.info("executor_giving_up", address=self.address, waiting_schedulers=list(self.waiting_schedulers))
        self.is_yielding = True
        self._wake.set()

    def _on_lease(self, waiting: tuple[str, ...]) -> None:
        waiting = tuple(i for i in waiting if i != self.config.scheduler_id) if self.is_ready else ()
        changed = waiting != self.waiting_schedulers
        self.waiting_schedulers = waiting
        if waiting or changed:
            self.owner.on_waiting_schedulers(self)

    def _on_health(self, serving: bool, asked_at: float | None = None) -> None:
        """An executor going NOT_SERVING while connected is shutting down: its running sequences go on
        until its stream ends (then any left are recomputed elsewhere), nothing new is placed on it
        unless it says SERVING again. An answer to a check sent before the connection is ignored."""
        if asked_at is not None and asked_at < self._connected_at:
            return
        if not serving and self.is_ready and not self.is_leaving:
            log.info("executor_leaving", address=self.address)
            self.is_leaving = True
            self.owner.on_leaving(self)
            self._wake.set()
        elif serving and self.is_leaving and self.is_ready:
            log.info("executor_serving_again", address=self.address)
            self.is_leaving = False
            self.owner.on_ready(self)

    def status(self) -> ReplicaStatus:
        scheduler, description = self.scheduler, self.description
        if scheduler is None or description is None:
            return ReplicaStatus(
                self.address, False, self.is_draining, num_requests_placed=self.num_requests_placed,
                num_plan_bytes_sent=self.client.num_plan_bytes_sent,
            )
        pool = scheduler.kv_cache_manager.block_pool
        return ReplicaStatus(
            address=self.address,
            is_ready=self.is_ready,
            is_draining=self.is_draining or self.is_leaving,
            device=description.device,
            block_size=description.block_size,
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_swapped=scheduler.num_swapped,
            num_device_blocks=pool.num_blocks,
            num_free_device_blocks=pool.num_free_blocks,
            num_used_device_blocks=pool.num_used_blocks,
            num_cached_device_blocks=pool.num_cached_blocks,
            num_free_cached_device_blocks=pool.num_free_cached_blocks(),
            num_host_blocks=scheduler.config.num_host_blocks,
            num_free_host_blocks=scheduler.swap_space.num_free_blocks,
            num_requests_placed=self.num_requests_placed,
            num_plan_bytes_sent=self.client.num_plan_bytes_sent,
            counters=scheduler.counters,
        )

    async def _run(self) -> None:
        while not self.is_stopped:
            try:
                if not self.client.is_connected:
                    if self.is_draining:
                        break
                    await self._connect()
                elif self.scheduler is None or not (self.scheduler.has_work or self.scheduler.num_in_flight):
                    if self.is_draining:
                        break
                    if self.is_leaving:
                        await self._leave()
                        continue
                    if self.is_yielding:
                        await self._yield()
                        continue
                    await self._idle()
                else:
                    await self._step()
            except Unavailable as error:
                self._on_lost(str(error))
            except Exception as error:  # the loop must outlive a bug; clients must not hang
                log.exception("engine_step_failed", address=self.address)
                scheduler, self.scheduler = self.scheduler, None
                sequence_ids = [seq.sequence_id for seq in scheduler.running + list(scheduler.waiting)] if scheduler else []
                self.owner.on_failed(self, sequence_ids, PagewireError(f"internal error in the engine: {error!r}"))
                await self.client.close()
                self._on_lost("engine error")
        if self.is_draining and not self.is_stopped:
            await self.client.close()
            self._is_ready = False
            self.is_stopped = True
            log.info("executor_drained", address=self.address)
            self.owner.on_drained(self)

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
            raise Unavailable(f"executor {self.address} closed the step stream")

    async def _leave(self) -> None:
        """Closes the idle stream of an executor shutting down; it holds no sequence of this replica."""
        await self.client.close()
        self._is_ready = False
        self._sent_at.clear()
        log.info("executor_left", address=self.address)
        self.owner.on_leaving(self)

    async def _yield(self) -> None:
        """Closes the idle stream and releases the lease (see `give_up`)."""
        await self.client.close()
        self._is_ready = False
        self._sent_at.clear()
        self.waiting_schedulers = ()
        released = await self.lease_client.release()
        self._retry_at = time.monotonic() + YIELD_BACKOFF_SECONDS
        self.is_yielding = False
        log.info("executor_given_up", address=self.address, lease_released=released)
        self.owner.on_leaving(self)

    def _on_lost(self, reason: str) -> None:
        log.warning("executor_lost", address=self.address, reason=reason)
        self._is_ready = False
        self._sent_at.clear()
        sequences = self.scheduler.evacuate() if self.scheduler is not None else []
        self._expected_hits.clear()
        self.owner.on_lost(self, sequences)

    async def _connect(self) -> None:
        if (pause := self._retry_at - time.monotonic()) > 0:
            await asyncio.sleep(pause)
        if not self.owner.may_take(self):
            # At its share: takes nothing more, but keeps asking, so that the owners of the executors it
            # does not hold still count it among the schedulers dividing the set.
            await self.lease_client.ask()
            await asyncio.sleep(RECONNECT_INTERVAL_SECONDS)
            return
        self._connect_attempts += 1
        try:
            description = await self.client.connect()
        except Unavailable as error:
            log.info(
                "executor_connect_retry", address=self.address, attempt=self._connect_attempts,
                reason=str(error), retry_in_seconds=RECONNECT_INTERVAL_SECONDS,
            )
            await asyncio.sleep(RECONNECT_INTERVAL_SECONDS)
            return
        except Unauthenticated as error:
            await self._unusable(ValueError(f"it refused this scheduler's executor token: {error}"))
            return
        try:
            self._prepare(description)
            self.owner.accept(self, description)
        except ValueError as error:
            # The executor cannot serve these settings (e.g. its KV pool is smaller than max_model_len),
            # or serves another model than the other executors.
            await self._unusable(error)
            return
        self.description = description
        self._is_ready = True
        self.is_leaving = False
        self._connected_at = time.monotonic()
        self._connect_attempts = 0
        log.info(
            "executor_connected", address=self.address, model=description.model_name,
            device=description.device, num_device_blocks=description.num_device_blocks,
        )
        self.owner.on_ready(self)
        self._wake.set()

    async def _unusable(self, error: ValueError) -> None:
        """Fatal for the first executor (the owner says so), else retried after a pause."""
        await self.client.close()
        if self.owner.on_unusable(self, error):
            self.is_stopped = True
            return
        log.error(
            "executor_unusable", address=self.address, reason=str(error), retry_in_seconds=UNUSABLE_RETRY_SECONDS,
        )
        await asyncio.sleep(UNUSABLE_RETRY_SECONDS)

    def _prepare(self, description: ExecutorDescription) -> None:
        """Keeps the scheduler (and its counters) for the same executor geometry, costing preemptions
        with the speeds the executor measured this time; else builds a new one. Raises ValueError when
        the executor cannot serve these settings. The scheduler holds no sequence here: they were
        evacuated when the executor was lost."""
        self._sent_at.clear()
        if self.scheduler is not None and self.description is not None and (
            self.description.same_cache_geometry(description)
        ):
            self.scheduler.reset_executor_state()
            self.scheduler.use_transfer_speeds(description.transfer_speeds)
        else:
            self.scheduler = self._build(description)

    def _build(self, description: ExecutorDescription) -> Scheduler:
        config = self.config
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            requested, limit = getattr(config, name), getattr(description, name)
            if requested is not None and limit < requested:
                log.warning(
                    "executor_limit_lowers_setting", address=self.address, setting=name, requested=requested,
                    executor_limit=limit,
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
            max_loras=description.max_loras if config.enable_lora else 0,
        )
        pool = BlockPool(description.num_device_blocks)
        kv_cache_manager = KVCacheManager(pool, description.block_size, config.enable_prefix_caching)
        speculative = config.speculative
        proposer = proposer_from(speculative, description.max_model_drafts)
        scheduler = Scheduler(scheduler_config, kv_cache_manager, proposer)
        scheduler.speculation.adaptive = speculative is None or speculative.adaptive
        return scheduler

    async def _step(self) -> None:
        """One iteration: fill the pipeline up to `max_plans_in_flight` plans, then await, apply and
        stream the oldest result. Everything but the awaited executor calls is synchronous policy code;
        results come back, and are applied, in the order their plans were sent."""
        scheduler = self.scheduler
        assert scheduler is not None
        started = time.perf_counter()
        while scheduler.num_in_flight < self._max_plans_in_flight(scheduler):
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
            log.error("step_rejected", address=self.address, error=str(error))
            adapter = None if error.adapter_slot is None else scheduler.lora_slots.adapter_at(error.adapter_slot)
            if adapter is not None:
                self.owner.on_adapter_unreadable(self, adapter, str(error))
            await self.client.close()
            raise Unavailable(f"executor {self.address} rejected a plan") from error
        self.owner.on_outputs(self, outputs)
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

    def _max_plans_in_flight(self, scheduler: Scheduler) -> int:
        """One plan at a time while the step after the plans in flight drafts for some sequence: drafts
        follow a sequence's last token, so they wait until no step of it is in flight. Else overlap:
        while no draft pays (under load, or drafts that keep failing), over a prompt's early chunks."""
        proposer, config = scheduler.proposer, scheduler.config
        if proposer is not None and scheduler.speculation.drafts_next_step(
            scheduler.running, min(proposer.num_speculative_tokens, config.max_num_batched_tokens - 1),
            config.max_model_len,
        ):
            return 1
        return self.config.max_plans_in_flight

    def _mark_scheduled(self, plan: StepPlan) -> None:
        self.owner.on_scheduled(self, plan)
