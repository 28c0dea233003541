"""The coordinator over executor replicas: places requests, re-places a lost executor's sequences,
follows the executor set as it changes, and answers what the servicers ask."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
import uuid
from collections.abc import Callable

import structlog

from scheduler_service.background_task import cancel_and_wait
from scheduler_service.engine_config import EngineConfig
from scheduler_service.engine_observer import EngineObserver
from scheduler_service.executor_description import ExecutorDescription
from scheduler_service.executor_discovery import ExecutorDiscovery, Resolver, resolve_host
from scheduler_service.executor_replica import ExecutorReplica
from scheduler_service.fair_share import fair_share, num_to_give_up
from scheduler_service.lora.adapter_catalog import AdapterCatalog
from scheduler_service.lora.adapter_registry import Adapter
from scheduler_service.placement import PlacementCandidate, choose_replica, choose_round_robin
from scheduler_service.replica_status import ReplicaStatus, sum_statuses
from scheduler_service.request_state import RequestState
from scheduler_service.sequence import Sequence
from scheduler_service.served_model import ServedModel
from scheduler_service.tokenizer import Tokenizer
from shared.errors import InvalidArgument, NotFound, PagewireError, ResourceExhausted, Unavailable
from shared.sampling_params import SamplingParams
from shared.step_plan import SequenceId, SequenceOutput, StepPlan

log = structlog.get_logger(__name__)

SUPERVISE_INTERVAL_SECONDS = 0.5


@dataclasses.dataclass(frozen=True, slots=True)
class LoraUsage:
    running: list[str]
    waiting: list[str]
    max_loras: int
    num_slot_loads: int


class Engine:
    """Owns the requests and one `ExecutorReplica` per executor address; every policy decision runs
    synchronously on the event loop.

    A new request goes to the ready, not draining, replica `choose_replica` picks (longest exact
    prefix-cache hit weighed against load). When an executor is lost, its sequences, outputs so far
    included, are placed again on the others and recomputed, as after a recompute preemption, so
    clients see neither a gap nor a repeat; with no executor ready they wait (new requests get
    UNAVAILABLE) and fail with UNAVAILABLE after `reconnect_grace_seconds`. Every replica serves the
    same model (`ServedModel`, from the first to describe itself); an executor of another model is
    refused with a logged error.
    """

    def __init__(
        self,
        config: EngineConfig,
        on_ready_change: Callable[[bool], None] = lambda ready: None,
        observer: EngineObserver | None = None,
        resolve: Resolver = resolve_host,
    ) -> None:
        self.config = config
        self.observer = observer or EngineObserver()
        self.on_ready_change = on_ready_change
        self.discovery = ExecutorDiscovery(config.executor_addresses, resolve)
        # Read once here (the TLS files): every replica's channels share it.
        self.executor_channel = config.executor_channel()
        self.model: ServedModel | None = None
        self.replicas: dict[str, ExecutorReplica] = {}
        self.requests: dict[SequenceId, RequestState] = {}
        self._placed: dict[SequenceId, ExecutorReplica] = {}
        # Sequences of lost executors waiting for a ready one, in arrival order, and since when.
        self._homeless: list[Sequence] = []
        self._homeless_since: float | None = None
        self._ids = itertools.count(1)
        self._arrivals = itertools.count(1)
        # Round-robin placement's next turn.
        self._turn = itertools.count()
        self._was_ready = False
        # The addresses the targets gave last (static ones included).
        self._addresses: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        # Set when the first executor cannot serve these settings: the server exits with it (code 2).
        self.adapters = AdapterCatalog(config.enable_lora)
        self._max_lora_rank = 0
        self.startup_error: ValueError | None = None
        self.failed = asyncio.Event()

    @property
    def is_ready(self) -> bool:
        """Whether a request can be placed now: some executor is ready and not draining."""
        return self.model is not None and any(replica.accepts_work for replica in self.replicas.values())

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.model.tokenizer if self.model is not None else None

    def start(self) -> None:
        self._addresses = set(self.discovery.static_addresses())
        for address in self.discovery.static_addresses():
            self._add_replica(address)
        self._task = asyncio.create_task(self._supervise(), name="engine")

    async def stop(self) -> None:
        for request in list(self.requests.values()):
            request.abort()
        await cancel_and_wait(self._task)
        for replica in list(self.replicas.values()):
            await replica.stop()

    def add_request(
        self,
        prompt_token_ids: tuple[int, ...],
        params: SamplingParams,
        request_id: str | None = None,
        cache_salt: str | None = None,
        adapter: Adapter | None = None,
    ) -> RequestState:
        """Queues a validated request on an executor; raises Unavailable or ResourceExhausted. Requests
        share cached prefix KV only when their `cache_salt`s and adapters are equal."""
        model = self.model
        if model is None or not self.is_ready:
            raise Unavailable("the scheduler is not connected to a ready executor; retry shortly")
        num_waiting = self.num_waiting
        if num_waiting >= self.config.max_queued_requests:
            raise ResourceExhausted(
                f"the queue holds {num_waiting} requests (--max-queued-requests "
                f"{self.config.max_queued_requests}); retry later"
            )
        sequence_id = SequenceId(next(self._ids))
        request = RequestState(
            request_id=request_id or uuid.uuid4().hex,
            sequence_id=sequence_id,
            prompt_token_ids=prompt_token_ids,
            params=params,
            tokenizer=model.tokenizer,
            eos_token_ids=model.eos_token_ids,
            max_model_len=model.max_model_len,
            observer=self.observer,
        )
        seq = Sequence(
            sequence_id=sequence_id,
            prompt_token_ids=prompt_token_ids,
            arrival_index=next(self._arrivals),
            sampling=params.to_options(model.eos_token_ids),
            cache_salt=cache_salt,
            adapter=adapter,
            speculative=params.speculative,
            max_num_tokens=None if params.max_tokens is None else len(prompt_token_ids) + params.max_tokens,
        )
        self._place(seq)
        self.requests[sequence_id] = request
        return request

    def abort(self, request: RequestState) -> None:
        """Ends a request the client gave up on; its blocks are freed now, the executor told next step."""
        if self.requests.pop(request.sequence_id, None) is None:
            return
        replica = self._placed.pop(request.sequence_id, None)
        if replica is not None:
            replica.abort_sequence(request.sequence_id)
        self._homeless = [seq for seq in self._homeless if seq.sequence_id != request.sequence_id]
        request.abort()
        log.info("request_aborted", request_id=request.request_id)

    def drain(self, address: str) -> ReplicaStatus:
        """Places nothing new on the executor at `address`; its running requests finish, then its
        stream closes. Raises NotFound for an address the scheduler does not drive."""
        replica = self.replicas.get(address)
        if replica is None:
            raise NotFound(f"no executor {address!r}; ServerInfo.executors lists the addresses driven")
        replica.drain()
        self._update_ready()
        return replica.status()

    def statuses(self) -> list[ReplicaStatus]:
        return [replica.status() for replica in self.replicas.values()]

    def totals(self) -> ReplicaStatus:
        """Every replica's status added up; waiting includes sequences with no executor yet."""
        total = sum_statuses(self.statuses())
        return dataclasses.replace(total, num_waiting=total.num_waiting + len(self._homeless))

    @property
    def num_waiting(self) -> int:
        return sum(r.scheduler.num_waiting for r in self.replicas.values() if r.scheduler) + len(self._homeless)

    @property
    def num_plan_bytes_sent(self) -> int:
        return sum(replica.client.num_plan_bytes_sent for replica in self.replicas.values())

    def _place(self, seq: Sequence) -> bool:
        """Puts `seq` on the cheapest executor taking work; False (nothing changed) when none is."""
        replicas = [replica for replica in self.replicas.values() if replica.accepts_work]
        candidates = []
        for replica in replicas:
            assert replica.scheduler is not None
            kv = replica.scheduler.kv_cache_manager
            hit = kv.find_cached_prefix(seq.token_ids, seq.cache_extra_keys)
            candidates.append(
                PlacementCandidate(
                    num_cached_prompt_tokens=hit.num_tokens,
                    # Prefix blocks that running sequences hold are shared, not added to.
                    num_load_tokens=replica.num_load_tokens() - hit.num_held_tokens,
                    num_free_tokens=kv.num_free_blocks * kv.block_size,
                )
            )
        if self.config.placement_policy == "round-robin":
            index = choose_round_robin(candidates, seq.num_tokens, next(self._turn))
        else:
            index = choose_replica(candidates, seq.num_tokens)
        if index is None:
            return False
        replicas[index].add_sequence(seq, candidates[index].num_cached_prompt_tokens)
        self._placed[seq.sequence_id] = replicas[index]
        return True

    def _place_homeless(self) -> None:
        """Places the sequences of lost executors, oldest first, each as a new arrival."""
        while self._homeless and self.is_ready:
            seq = self._homeless[0]
            seq.arrival_index = next(self._arrivals)
            if not self._place(seq):
                break
            self._homeless.pop(0)
        if not self._homeless:
            self._homeless_since = None

    def _add_replica(self, address: str) -> None:
        replica = ExecutorReplica(address, self.config, self, self.observer)
        self.replicas[address] = replica
        replica.start()
        log.info("executor_added", address=address)

    async def _supervise(self) -> None:
        """Follows DNS targets every `dns_refresh_seconds` and fails homeless requests past the grace."""
        next_resolve = 0.0
        while True:
            now = time.monotonic()
            if self.discovery.has_dns_targets and now >= next_resolve:
                next_resolve = now + self.config.dns_refresh_seconds
                await self._follow(await self.discovery.addresses())
            self._fail_homeless_after_grace()
            await asyncio.sleep(SUPERVISE_INTERVAL_SECONDS)

    async def _follow(self, addresses: list[str]) -> None:
        """Adds a replica per new address; one whose address went away is drained, then removed. A
        replica drained by `drain` stays (listed, idle) while its address resolves."""
        self._addresses = set(addresses)
        for address in addresses:
            if address not in self.replicas:
                self._add_replica(address)
        for address, replica in list(self.replicas.items()):
            if address in addresses:
                continue
            if replica.is_ready:
                replica.drain()
            else:
                # Not connected, so it holds no sequence (a lost executor's were evacuated).
                log.info("executor_removed", address=address)
                del self.replicas[address]
                await replica.stop()
        self._update_ready()

    def _fail_homeless_after_grace(self) -> None:
        since = self._homeless_since
        if since is None or time.monotonic() - since <= self.config.reconnect_grace_seconds:
            return
        self._fail_homeless(Unavailable(
            f"no executor came back within {self.config.reconnect_grace_seconds} s "
            "(--reconnect-grace-seconds); retry"
        ))

    def _fail_homeless(self, error: Unavailable) -> None:
        for seq in self._homeless:
            request = self.requests.pop(seq.sequence_id, None)
            if request is not None:
                request.fail(error)
        log.warning("requests_failed_no_executor", num_requests=len(self._homeless))
        self._homeless.clear()
        self._homeless_since = None

    def _update_ready(self) -> None:
        ready = self.is_ready
        if ready != self._was_ready:
            self._was_ready = ready
            self.on_ready_change(ready)

    # ReplicaOwner: what the replicas tell the coordinator.

    def accept(self, replica: ExecutorReplica, description: ExecutorDescription) -> None:
        if self.config.enable_lora and description.max_loras == 0:
            raise ValueError("it serves no LoRA adapters; start it with --enable-lora (`pagewire serve` passes it on)")
        if self.model is None:
            tokenizer = Tokenizer.from_model_path(self.config.tokenizer_dir or description.model_path)
            self.adapters.bind(description.lora_shape, description.max_lora_rank)
            self._load_startup_adapters()
            self.model = ServedModel.from_description(description, self.config.max_model_len, tokenizer)
            self._max_lora_rank = description.max_lora_rank
            return
        mismatch = self.model.mismatch(description)
        if mismatch is not None:
            if description.fingerprint != self.model.fingerprint and self._homeless and not self.is_ready:
                # Their answers so far came from the old weights: never continue them on other ones.
                self._fail_homeless(Unavailable(f"the model changed under this request: {mismatch}"))
            raise ValueError(f"executor {replica.address} serves another model: {mismatch}")
        if self.config.enable_lora and description.max_lora_rank < self._max_lora_rank:
            raise ValueError(
                f"its --max-lora-rank is {description.max_lora_rank}, the first executor's {self._max_lora_rank}; "
                "start every executor with the same LoRA settings"
            )

    def _load_startup_adapters(self) -> None:
        """--lora-modules, checked against the first executor's model; a bad one fails the start-up."""
        for module in self.config.lora_modules:
            name, _, path = module.partition("=")
            try:
                adapter, _ = self.adapters.register(name, self.adapters.inspect(name, path))
            except PagewireError as error:
                raise ValueError(f"--lora-modules {module}: {error}") from None
            log.info("adapter_loaded", name=name, path=adapter.path, rank=adapter.spec.rank,
                     target_modules=list(adapter.spec.target_modules), at="start-up")

    def lora_usage(self) -> LoraUsage:
        """Adapter names of the running and waiting requests (sorted, each once), slots, slot loads."""
        schedulers = [replica.scheduler for replica in self.replicas.values() if replica.scheduler is not None]
        running = {seq.adapter.name for s in schedulers for seq in s.running if seq.adapter is not None}
        waiting = {
            seq.adapter.name for seq in (*self._homeless, *(seq for s in schedulers for seq in s.waiting))
            if seq.adapter is not None
        }
        return LoraUsage(
            running=sorted(running), waiting=sorted(waiting),
            max_loras=max((s.lora_slots.num_slots for s in schedulers), default=0),
            num_slot_loads=sum(s.lora_slots.num_loads for s in schedulers),
        )

    def adapter_usage(self, adapter: Adapter) -> tuple[int, bool]:
        """(live requests using `adapter`, whether some executor holds it in a LoRA slot now)."""
        schedulers = [replica.scheduler for replica in self.replicas.values() if replica.scheduler is not None]
        sequences = [*self._homeless, *(seq for s in schedulers for seq in (*s.running, *s.waiting))]
        num_requests = sum(1 for seq in sequences if seq.adapter is adapter)
        return num_requests, any(s.lora_slots.is_resident(adapter) for s in schedulers)

    def on_unusable(self, replica: ExecutorReplica, error: ValueError) -> bool:
        if self.model is not None:
            return False
        # The first executor: a setting that can never work here; fail at start-up, not in a loop.
        log.error("executor_unusable", address=replica.address, reason=str(error), fatal=True)
        self.startup_error = ValueError(f"the executor at {replica.address} cannot serve: {error}")
        self.failed.set()
        return True

    def on_ready(self, replica: ExecutorReplica) -> None:
        self._update_ready()
        self._place_homeless()

    def on_lost(self, replica: ExecutorReplica, sequences: list[Sequence]) -> None:
        live = [seq for seq in sequences if seq.sequence_id in self.requests]
        for seq in sequences:
            self._placed.pop(seq.sequence_id, None)
        self._update_ready()
        if not live:
            return
        log.info("sequences_replaced", address=replica.address, num_sequences=len(live))
        self._homeless.extend(live)
        self._homeless.sort(key=lambda seq: seq.arrival_index)
        self._place_homeless()
        if self._homeless and self._homeless_since is None:
            self._homeless_since = time.monotonic()

    def on_failed(self, replica: ExecutorReplica, sequence_ids: list[SequenceId], error: PagewireError) -> None:
        for sequence_id in sequence_ids:
            self._placed.pop(sequence_id, None)
            request = self.requests.pop(sequence_id, None)
            if request is not None:
                request.fail(error)

    def on_outputs(self, replica: ExecutorReplica, outputs: list[SequenceOutput]) -> None:
        scheduler = replica.scheduler
        assert scheduler is not None
        for output in outputs:
            request = self.requests.get(output.sequence_id)
            seq = scheduler.get_sequence(output.sequence_id)
            if request is None or seq is None:
                continue
            request.num_cached_prompt_tokens = seq.num_cached_prompt_tokens or 0
            if request.on_output(output):
                del self.requests[output.sequence_id]
                self._placed.pop(output.sequence_id, None)
                replica.finish_sequence(output.sequence_id)

    def on_scheduled(self, replica: ExecutorReplica, plan: StepPlan) -> None:
        """Notes when each request first entered a plan (the end of its time queued)."""
        now = time.monotonic()
        for new in plan.new_sequences:
            request = self.requests.get(SequenceId(new.sequence_id))
            if request is not None:
                request.timeline.mark_scheduled(now)

    def on_leaving(self, replica: ExecutorReplica) -> None:
        self._update_ready()

    def _owned_and_others(self) -> tuple[list[ExecutorReplica], set[str]]:
        """The executors this scheduler holds, and the other schedulers that asked them for a lease lately."""
        owned = [r for r in self.replicas.values() if r.is_ready]
        return owned, {scheduler_id for r in owned for scheduler_id in r.waiting_schedulers}

    def may_take(self, replica: ExecutorReplica) -> bool:
        owned, others = self._owned_and_others()
        return not others or len(owned) < fair_share(len(self.replicas), len(others))

    def on_waiting_schedulers(self, replica: ExecutorReplica) -> None:
        """Gives one executor up when other schedulers wait and this one holds more than its fair share
        (fair_share.py); one at a time (the next once that one is released, at a later lease poll), the
        least loaded, never the last."""
        owned, others = self._owned_and_others()
        if any(r.is_yielding for r in owned):
            return
        if num_to_give_up(len(owned), len(self.replicas), len(others)) == 0:
            return
        candidates = [r for r in owned if r.accepts_work]
        if len(candidates) < 2:
            return
        victim = min(candidates, key=lambda r: r.num_load_tokens())
        log.info("executor_share_exceeded", num_owned=len(owned), num_executors=len(self.replicas),
                 other_schedulers=sorted(others), giving_up=victim.address)
        victim.give_up()
        self._update_ready()

    def on_adapter_unreadable(self, replica: ExecutorReplica, adapter: Adapter, reason: str) -> None:
        """Unloads the adapter (its files changed since they were checked) and fails its requests with
        INVALID_ARGUMENT; the others go on after the stream restarts."""
        if adapter.is_registered:
            self.adapters.unregister(adapter.name)
        log.error("adapter_unreadable", name=adapter.name, path=adapter.path, reason=reason,
                  fix="load it again once its files are whole (LoadAdapter)")
        error = InvalidArgument(
            f"adapter {adapter.name!r} can no longer be read from {adapter.path} and was unloaded: {reason}"
        )
        for sequence_id, placed in list(self._placed.items()):
            seq = placed.scheduler.get_sequence(sequence_id) if placed.scheduler is not None else None
            if seq is not None and seq.adapter is adapter:
                placed.abort_sequence(sequence_id)
                self._placed.pop(sequence_id, None)
                request = self.requests.pop(sequence_id, None)
                if request is not None:
                    request.fail(error)

    def on_drained(self, replica: ExecutorReplica) -> None:
        if replica.address not in self._addresses:
            self.replicas.pop(replica.address, None)
        self._update_ready()
