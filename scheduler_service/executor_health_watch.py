"""Watches an executor's gRPC health, so that an executor shutting down (SIGTERM) gets no new work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler_service.executor_channel import ExecutorChannel

EXECUTOR_SERVICE = "pagewire.v1.Executor"
POLL_SECONDS = 1.0


class ExecutorHealthWatch:
    """Asks the executor's health service about `pagewire.v1.Executor` every `POLL_SECONDS` and calls
    `on_serving(serving, asked_at)` with each answer (`asked_at`: time.monotonic() when the check was
    sent, so an answer older than the replica's connection can be told apart); no answer calls nothing (its Step stream tells the replica
    when it is gone). A unary Check, not a Watch stream: a stream left open would be cancelled, with
    a logged traceback, whenever the executor shuts down."""

    def __init__(self, address: str, on_serving: Callable[[bool, float], None],
                 channel: ExecutorChannel = ExecutorChannel()) -> None:
        self.address = address
        self.channel = channel
        self.on_serving = on_serving
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

    async def _poll(self) -> None:
        async with self.channel.open(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service=EXECUTOR_SERVICE)
            while True:
                asked_at = time.monotonic()
                try:
                    response = await stub.Check(request, timeout=POLL_SECONDS)
                except grpc.aio.AioRpcError:
                    pass
                else:
                    self.on_serving(response.status == health_pb2.HealthCheckResponse.SERVING, asked_at)
                await asyncio.sleep(POLL_SECONDS)
