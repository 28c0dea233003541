"""Watches an executor's gRPC health, so that an executor shutting down (SIGTERM) gets no new work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from scheduler_service.background_task import cancel_and_wait
from scheduler_service.executor_channel import ExecutorChannel

EXECUTOR_SERVICE = "pagewire.v1.Executor"
POLL_SECONDS = 1.0
# The channel outlives executor restarts: it must try to reconnect as often as it is polled (grpc's default
# backoff grows to minutes; measured here, a channel whose executor was gone 60 s failed 12 s more after
# the executor was back).
CHANNEL_OPTIONS = (("grpc.max_reconnect_backoff_ms", int(POLL_SECONDS * 1000)),)


class ExecutorHealthWatch:
    """Asks the executor's health service about `pagewire.v1.Executor` every `POLL_SECONDS` and calls
    `on_serving(serving, asked_at)` with each answer (`asked_at`: time.monotonic() when the check was
    sent, so an answer older than the replica's connection can be told apart); no answer calls nothing
    (its Step stream tells the replica when it is gone). A unary Check, not a Watch stream: a stream left
    open would be cancelled, with a logged traceback, whenever the executor shuts down.

    It owns one long-lived `channel` to the executor, which the lease client (ExecutorLeaseClient) shares:
    opened on first use, closed by `stop`."""

    def __init__(self, address: str, on_serving: Callable[[bool, float], None],
                 channel: ExecutorChannel = ExecutorChannel()) -> None:
        self.address = address
        self.on_serving = on_serving
        self.channel_settings = channel
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        """The long-lived channel to the executor (opened now if it is not yet); on the event loop only."""
        if self._channel is None:
            self._channel = self.channel_settings.open(self.address, CHANNEL_OPTIONS)
        return self._channel

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name=f"health {self.address}")

    async def stop(self) -> None:
        """Ends the polling and closes the channel (nothing may use it after)."""
        await cancel_and_wait(self._task)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _poll(self) -> None:
        stub = health_pb2_grpc.HealthStub(self.channel)
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
