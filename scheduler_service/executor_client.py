"""The scheduler's connection to one executor: Describe, then one long-lived Step stream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

import grpc

from scheduler_service.executor_channel import ExecutorChannel
from scheduler_service.executor_description import ExecutorDescription
from shared.bearer_auth import bearer_metadata
from shared.errors import Unauthenticated, Unavailable
from shared.pb.pagewire.v1 import executor_pb2 as pb
from shared.pb.pagewire.v1 import executor_pb2_grpc as pb_grpc
from shared.plan_codec import plan_to_pb, result_from_pb
from shared.scheduler_identity import PROCESS_SCHEDULER_ID, SCHEDULER_ID_METADATA_KEY
from shared.step_plan import StepPlan, StepResult

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
T = TypeVar("T")


class ExecutorClient:
    """Sends plans and reads results, in order, over one Step stream.

    Several plans may be sent before their results are read (`send` then `receive`); the executor
    answers them in the order sent. Any transport failure surfaces as `Unavailable`; the caller reconnects with `connect()`, which opens
    a fresh stream (the executor then holds no sequences).
    """

    def __init__(self, address: str, scheduler_id: str = PROCESS_SCHEDULER_ID, token: str | None = None,
                 channel: ExecutorChannel = ExecutorChannel()) -> None:
        self.address = address
        self._channel_settings = channel
        # Sent on Describe and Step (and by the lease client): the executor serves one scheduler id at a
        # time (FAILED_PRECONDITION naming its owner otherwise), and only to callers with its token when it
        # has one.
        self.metadata: tuple[tuple[str, str], ...] = (
            (SCHEDULER_ID_METADATA_KEY, scheduler_id), *bearer_metadata(token)
        )
        self._channel: grpc.aio.Channel | None = None
        self._call: grpc.aio.StreamStreamCall | None = None
        # Encoded size of every plan sent since start-up, for the plan-size metric.
        self.num_plan_bytes_sent = 0

    async def connect(self, timeout: float = 5.0) -> ExecutorDescription:
        """Describes the executor and opens a new Step stream; raises Unavailable when it cannot."""
        await self.close()
        self._channel = self._channel_settings.open(
            self.address,
            [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        stub = pb_grpc.ExecutorStub(self._channel)
        try:
            description = await stub.Describe(
                pb.DescribeRequest(), timeout=timeout, wait_for_ready=False, metadata=self.metadata
            )
        except grpc.aio.AioRpcError as error:
            await self.close()
            if error.code() is grpc.StatusCode.UNAUTHENTICATED:
                raise Unauthenticated(str(error.details())) from error
            raise Unavailable(f"executor {self.address} is unavailable: {error.details()}") from error
        self._call = stub.Step(metadata=self.metadata)
        return ExecutorDescription.from_pb(description)

    @property
    def is_connected(self) -> bool:
        return self._call is not None

    async def step(self, plan: StepPlan) -> StepResult:
        """Sends one plan and reads its result; only valid with no other plan in flight."""
        await self.send(plan)
        return await self.receive()

    async def send(self, plan: StepPlan) -> None:
        """Sends a plan; its result comes back from `receive`, after those of earlier plans."""
        call = self._require_call()
        message = plan_to_pb(plan)
        self.num_plan_bytes_sent += message.ByteSize()
        await self._guarded(call.write(message))

    async def receive(self) -> StepResult:
        """The result of the oldest plan sent and not yet answered."""
        message = await self._guarded(self._require_call().read())
        if message is grpc.aio.EOF:
            await self.close()
            raise Unavailable(f"executor {self.address} closed the step stream")
        return result_from_pb(message)

    def _require_call(self) -> grpc.aio.StreamStreamCall:
        if self._call is None:
            raise Unavailable(f"not connected to executor {self.address}")
        return self._call

    async def _guarded(self, operation: Awaitable[T]) -> T:
        """Awaits a stream operation; any transport failure closes the client and raises Unavailable."""
        try:
            return await operation
        except grpc.aio.AioRpcError as error:
            await self.close()
            raise Unavailable(f"executor {self.address} stream failed: {error.details()}") from error
        except asyncio.InvalidStateError as error:
            # The call had already ended (the executor went away while we were idle).
            await self.close()
            raise Unavailable(f"executor {self.address} closed the step stream") from error

    async def wait_closed(self) -> None:
        """Returns when the Step stream has ended (at once when there is none)."""
        if self._call is not None:
            await self._call.code()

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
            self._call = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
