"""ExecutorLeaseClient against a real (simulated) executor on loopback: who waits for the executor, the
lease released only by its owner once its Step stream closed, the GetLease poll, and every RPC on the
health watch's one channel, also while the executor is gone.

The executor is a simulated one (`--simulate cpu_tiny`): the real Executor service and lease with no
model. Its lease outlasts each test (`LEASE_SECONDS`): an executor free at once was released, not expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from scheduler_service.executor_channel import ExecutorChannel
from scheduler_service.executor_client import ExecutorClient
from scheduler_service.executor_health_watch import ExecutorHealthWatch
from scheduler_service.executor_lease_client import ExecutorLeaseClient
from shared.step_plan import StepPlan
from tests.helpers.processes import free_port, running

LEASE_SECONDS = 60.0
POLL_WAIT_SECONDS = 10.0


@contextlib.contextmanager
def simulated_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    monkeypatch.setenv("PAGEWIRE_CACHE", str(tmp_path / "cache"))
    with running(["executor", "--simulate", "cpu_tiny", "--port", str(port),
                  "--executor-lease-seconds", str(LEASE_SECONDS)], address):
        yield address


def lease_client_of(
    client: ExecutorClient, on_waiting: Callable[[tuple[str, ...]], None] = lambda waiting: None
) -> ExecutorLeaseClient:
    """The lease client an ExecutorReplica builds for `client`: same identity, its own health watch."""
    watch = ExecutorHealthWatch(client.address, lambda serving, asked_at: None)
    return ExecutorLeaseClient(watch, client.metadata, on_waiting)


async def own(client: ExecutorClient) -> None:
    """Connects and runs one empty plan: once its result is back, the executor has the stream open."""
    await client.connect()
    result = await client.step(StepPlan(step_id=1))
    assert result.step_id == 1


async def close(clients: list[ExecutorClient], leases: list[ExecutorLeaseClient]) -> None:
    for client in clients:
        await client.close()
    for lease in leases:
        await lease.stop()
        await lease.watch.stop()


def test_the_waiting_schedulers_are_named_and_only_the_owner_releases_once_its_stream_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def story() -> dict[str, object]:
        a, b, c = (ExecutorClient(address, name) for name in ("a", "b", "c"))
        leases = [lease_client_of(client) for client in (a, b, c)]
        lease_a, lease_b, lease_c = leases
        seen: dict[str, object] = {}
        try:
            seen["before"] = await lease_a.waiting_scheduler_ids()
            await own(a)
            await lease_c.ask()
            await lease_b.ask()
            seen["owned"] = (await lease_a.waiting_scheduler_ids(), await lease_b.waiting_scheduler_ids())
            seen["release by another"] = await lease_b.release()
            seen["release with the stream open"] = await lease_a.release()
            await a.close()
            seen["release"] = await lease_a.release()
            await own(b)  # at once, well inside a's lease: it was released
            seen["taken over"] = await lease_b.waiting_scheduler_ids()
        finally:
            await close([a, b, c], leases)
        return seen

    with simulated_executor(tmp_path, monkeypatch) as address:
        seen = asyncio.run(story())
    assert seen == {
        "before": (),
        "owned": (("b", "c"), ("b", "c")),
        "release by another": False,
        "release with the stream open": False,
        "release": True,
        "taken over": ("c",),  # b holds it now, a was never refused
    }


def test_the_poll_reports_each_answer_until_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def story() -> tuple[list[tuple[str, ...]], int]:
        answers: list[tuple[str, ...]] = []
        owner, other = ExecutorClient(address, "owner"), ExecutorClient(address, "other")
        lease, asker = lease_client_of(owner, answers.append), lease_client_of(other)
        try:
            await own(owner)
            lease.start()
            deadline = time.monotonic() + POLL_WAIT_SECONDS
            while not answers:
                assert time.monotonic() < deadline, "no GetLease answer"
                await asyncio.sleep(0.05)
            await asker.ask()  # refused: counted as waiting for WAITING_SECONDS (5 s), several polls
            while answers[-1] != ("other",):
                assert time.monotonic() < deadline, f"the poll never saw the other scheduler: {answers}"
                await asyncio.sleep(0.05)
            await lease.stop()
            num_answers = len(answers)
            await asyncio.sleep(2.5)  # two poll periods and more
        finally:
            await close([owner, other], [lease, asker])
        return answers, len(answers) - num_answers

    with simulated_executor(tmp_path, monkeypatch) as address:
        answers, num_after_stop = asyncio.run(story())
    assert answers[0] == ()
    assert set(answers) == {(), ("other",)} and answers[-1] == ("other",)
    assert num_after_stop == 0


def test_every_rpc_goes_over_the_watchs_one_channel_and_a_gone_executor_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[str] = []
    open_channel = ExecutorChannel.open

    def counting_open(self: ExecutorChannel, address: str,
                      options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
        opened.append(address)
        return open_channel(self, address, options)

    async def story(address: str) -> tuple[object, ...]:
        client = ExecutorClient(address, "asker")
        lease = lease_client_of(client)
        try:
            lease.watch.start()
            for _ in range(3):
                await lease.ask()
            answers = (await lease.waiting_scheduler_ids(), await lease.release())
            await asyncio.sleep(1.5)  # a health check or two on the same channel
        finally:
            await close([client], [lease])
        return answers

    monkeypatch.setattr(ExecutorChannel, "open", counting_open)
    with simulated_executor(tmp_path, monkeypatch) as address:
        alive = asyncio.run(story(address))
    gone = asyncio.run(story(address))
    assert alive == ((), False)  # nobody owns it, so nobody refused the asks; only an owner releases
    assert gone == (None, False)
    assert opened == [address, address]  # one channel per lease client, whatever it sent
