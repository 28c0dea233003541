"""Watches an executor's gRPC health, so that an executor shutting down (SIGTERM) gets no new work, and
its lease, so that schedulers sharing an executor set can divide it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler_service.executor_channel import ExecutorChannel
from shared.pb.pagewire.v1 import executor_pb2 as pb
from shared.pb.pagewire.v1 import executor_pb2_grpc as pb_grpc

EXECUTOR_SERVICE = "pagewire.v1.Executor"
POLL_SECONDS = 1.0
# ReleaseLease right after the Step stream closed can reach the executor before it noticed the close.
RELEASE_ATTEMPTS = 10
RELEASE_RETRY_SECONDS = 0.1


class ExecutorHealthWatch:
    """Asks the executor's health service about `pagewire.v1.Executor` every `POLL_SECONDS` and calls
    `on_serving(serving, asked_at)` with each answer (`asked_at`: time.monotonic() when the check was
    sent, so an answer older than the replica's connection can be told apart); no answer calls nothing (its Step stream tells the replica
    when it is gone). A unary Check, not a Watch stream: a stream left open would be cancelled, with
    a logged traceback, whenever the executor shuts down.

    With `on_lease`, each poll also asks GetLease (with `metadata`: this scheduler's id and executor
    token) and calls `on_lease(waiting_scheduler_ids)`: the other schedulers that asked for this executor
    lately."""

    def __init__(self, address: str, on_serving: Callable[[bool, float], None],
                 channel: ExecutorChannel = ExecutorChannel(), metadata: Sequence[tuple[str, str]] = (),
                 on_lease: Callable[[tuple[str, ...]], None] | None = None) -> None:
        self.address = address
        self.on_serving = on_serving
        self.channel = channel
        self.metadata = tuple(metadata)
        self.on_lease = on_lease
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name=f"health {self.address}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def release_lease(self) -> bool:
        """Gives this scheduler's lease on the executor up (its Step stream must be closed); False when
        the executor did not take it (gone, or still seeing the stream open after the retries)."""
        async with self.channel.open(self.address) as channel:
            stub = pb_grpc.ExecutorStub(channel)
            for _ in range(RELEASE_ATTEMPTS):
                try:
                    await stub.ReleaseLease(pb.ReleaseLeaseRequest(), timeout=POLL_SECONDS, metadata=self.metadata)
                    return True
                except grpc.aio.AioRpcError as error:
                    if error.code() is not grpc.StatusCode.ABORTED:  # only "the stream is still open" passes
                        return False
                await asyncio.sleep(RELEASE_RETRY_SECONDS)
        return False

    async def _poll(self) -> None:
        async with self.channel.open(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            executor = pb_grpc.ExecutorStub(channel)
            request = health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE)
            while True:
                asked_at = time.monotonic()
                try:
                    response = await stub.Check(request, timeout=POLL_SECONDS)
                except grpc.aio.AioRpcError:
                    pass
                else:
                    self.on_serving(response.status == health_pb2.HealthCheckResponse.SERVING, asked_at)
                if self.on_lease is not None:
                    try:
                        lease = await executor.GetLease(pb.GetLeaseRequest(), timeout=POLL_SECONDS,
                                                        metadata=self.metadata)
                    except grpc.aio.AioRpcError:
                        pass
                    else:
                        self.on_lease(tuple(lease.waiting_scheduler_ids))
                await asyncio.sleep(POLL_SECONDS)
