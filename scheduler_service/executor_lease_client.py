"""The scheduler's side of an executor's lease (executor_service/executor_lease.py): which other schedulers
wait for the executor, asking for it, giving it up. Over the health watch's long-lived channel, so
asking every fraction of a second opens no channel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import grpc

from scheduler_service.background_task import cancel_and_wait
from scheduler_service.executor_health_watch import POLL_SECONDS, ExecutorHealthWatch
from shared.pb.pagewire.v1 import executor_pb2 as pb
from shared.pb.pagewire.v1 import executor_pb2_grpc as pb_grpc

ASK_TIMEOUT_SECONDS = 5.0
# ReleaseLease right after the Step stream closed can reach the executor before it noticed the close.
RELEASE_ATTEMPTS = 10
RELEASE_RETRY_SECONDS = 0.1


class ExecutorLeaseClient:
    """Lease RPCs on `watch`'s channel, sent with `metadata` (this scheduler's id and executor token, as on
    its Step stream). Once started, asks GetLease every `POLL_SECONDS` (the watch's cadence) and calls
    `on_waiting(waiting_scheduler_ids)` with each answer; no answer calls nothing. Stop it before the
    watch, whose `stop` closes the channel."""

    def __init__(self, watch: ExecutorHealthWatch, metadata: Sequence[tuple[str, str]],
                 on_waiting: Callable[[tuple[str, ...]], None]) -> None:
        self.watch = watch
        self.metadata = tuple(metadata)
        self.on_waiting = on_waiting
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return self.watch.address

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name=f"lease {self.address}")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def waiting_scheduler_ids(self) -> tuple[str, ...] | None:
        """One GetLease: the ids of the schedulers the executor refused lately, its holder left out, sorted;
        None when it does not answer."""
        try:
            lease = await self._stub().GetLease(pb.GetLeaseRequest(), timeout=POLL_SECONDS,
                                                metadata=self.metadata)
        except grpc.aio.AioRpcError:
            return None
        return tuple(lease.waiting_scheduler_ids)

    async def ask(self, timeout: float = ASK_TIMEOUT_SECONDS) -> None:
        """One Describe, nothing taken: an executor another scheduler owns then counts this scheduler as
        waiting for it (GetLease), so its owner sees how many schedulers share the set. Errors are the
        expected answer and are ignored."""
        try:
            await self._stub().Describe(pb.DescribeRequest(), timeout=timeout, metadata=self.metadata)
        except grpc.aio.AioRpcError:
            pass

    async def release(self) -> bool:
        """Gives this scheduler's lease on the executor up (its Step stream must be closed); False when
        the executor did not take it (gone, or still seeing the stream open after the retries)."""
        stub = self._stub()
        for _ in range(RELEASE_ATTEMPTS):
            try:
                await stub.ReleaseLease(pb.ReleaseLeaseRequest(), timeout=POLL_SECONDS,
                                        metadata=self.metadata)
                return True
            except grpc.aio.AioRpcError as error:
                if error.code() is not grpc.StatusCode.ABORTED:  # only "the stream is still open" passes
                    return False
            await asyncio.sleep(RELEASE_RETRY_SECONDS)
        return False

    def _stub(self) -> pb_grpc.ExecutorStub:
        return pb_grpc.ExecutorStub(self.watch.channel)

    async def _poll(self) -> None:
        while True:
            waiting = await self.waiting_scheduler_ids()
            if waiting is not None:
                self.on_waiting(waiting)
            await asyncio.sleep(POLL_SECONDS)
