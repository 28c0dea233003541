"""pagewire's real engine run in-process against an executor process, with every step observed.

The engine is used as `pagewire scheduler` runs it; two seams are observed without changing what it
does: its executor client (the plan sent and the result received each step) and its `stats` (the step's
wall and scheduler time, recorded after the step's clock stopped). KV occupancy and plan size are read
inside `record`, outside the timed region, so observing costs the measured step nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.workloads import BenchRequest
from scheduler_service.engine import Engine
from scheduler_service.engine_config import EngineConfig
from scheduler_service.executor_client import ExecutorClient
from scheduler_service.executor_replica import ExecutorReplica
from scheduler_service.request_state import RequestState
from shared.plan_codec import plan_to_pb
from shared.sampling_params import SamplingParams
from shared.step_plan import StepPlan, StepResult

READY_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class StepSample:
    """One engine step. Seconds; `forward_s` is the executor's forward timing (input building included,
    sampling excluded); KV figures are taken after the step, when this step's tokens are stored."""

    num_running: int
    num_new_sequences: int
    num_continued_sequences: int
    num_scheduled_tokens: int
    is_decode_only: bool
    plan_bytes: int
    wall_s: float
    scheduler_s: float
    executor_s: float
    forward_s: float
    sample_s: float
    num_allocated_slots: int
    num_stored_tokens: int
    plan: StepPlan


class _RecordingClient:
    """The engine's ExecutorClient, remembering the plans in flight and the last result received; every
    other attribute is the client's own. Works whether the engine sends and receives separately (plans
    in flight) or calls `step`."""

    def __init__(self, client: ExecutorClient) -> None:
        self.client = client
        self.plans_in_flight: dict[int, StepPlan] = {}
        self.last_result: StepResult | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    async def send(self, plan: StepPlan) -> None:
        self.plans_in_flight[plan.step_id] = plan
        await self.client.send(plan)

    async def receive(self) -> StepResult:
        self.last_result = await self.client.receive()
        return self.last_result

    async def step(self, plan: StepPlan) -> StepResult:
        self.plans_in_flight[plan.step_id] = plan
        self.last_result = await self.client.step(plan)
        return self.last_result

    def take_last(self) -> tuple[StepPlan, StepResult]:
        """The last result received and its plan, which is no longer in flight."""
        result = self.last_result
        assert result is not None, "no result received yet"
        return self.plans_in_flight.pop(result.step_id), result


class _StepRecorder:
    """Stands in for the engine's StepStats: `record` is called once per step, after its clock stopped."""

    def __init__(self, replica: ExecutorReplica, client: _RecordingClient) -> None:
        self.replica = replica
        self.client = client
        self.samples: list[StepSample] = []

    def record(
        self, wall_seconds: float, scheduler_seconds: float, forward_seconds: float, num_tokens: int
    ) -> None:
        plan, result = self.client.take_last()
        scheduler = self.replica.scheduler
        assert scheduler is not None
        kv = scheduler.kv_cache_manager
        self.samples.append(
            StepSample(
                num_running=scheduler.num_running,
                num_new_sequences=len(plan.new_sequences),
                num_continued_sequences=len(plan.continued_sequences),
                num_scheduled_tokens=num_tokens,
                is_decode_only=not plan.new_sequences
                and all(c.num_scheduled_tokens == 1 for c in plan.continued_sequences),
                plan_bytes=plan_to_pb(plan).ByteSize(),
                wall_s=wall_seconds,
                scheduler_s=scheduler_seconds,
                executor_s=result.timing.total_seconds,
                forward_s=forward_seconds,
                sample_s=result.timing.sample_seconds,
                num_allocated_slots=kv.num_held_blocks() * kv.block_size,
                num_stored_tokens=sum(seq.num_computed_tokens for seq in scheduler.running),
                plan=plan,
            )
        )


async def _drain(request: RequestState) -> None:
    while True:
        delta = await request.deltas.get()
        if isinstance(delta, BaseException):
            raise delta
        if delta.finish_reason is not None:
            return


async def _probe(config: EngineConfig, requests: Sequence[BenchRequest]) -> list[StepSample]:
    engine = Engine(config)
    engine.start()
    # The replica's loop has not run yet (no await since start): swap its client and stats in.
    (replica,) = engine.replicas.values()
    client = _RecordingClient(replica.client)
    recorder = _StepRecorder(replica, client)
    replica.client = client  # type: ignore[assignment]
    replica.stats = recorder  # type: ignore[assignment]
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not engine.is_ready:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not connect to {config.executor_addresses}")
            await asyncio.sleep(0.05)
        states = [
            engine.add_request(
                r.prompt_token_ids, SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True)
            )
            for r in requests
        ]
        await asyncio.gather(*(_drain(state) for state in states))
    finally:
        await engine.stop()
    return recorder.samples


def run_engine_probe(
    executor_address: str, requests: Sequence[BenchRequest], max_num_seqs: int, max_num_batched_tokens: int
) -> list[StepSample]:
    """Runs `requests` (all arriving at once, greedy, exactly max_tokens each) and returns every step."""
    config = EngineConfig(
        executor_addresses=(executor_address,),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    return asyncio.run(_probe(config, requests))
