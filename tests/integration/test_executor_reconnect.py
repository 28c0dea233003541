"""The scheduler without its executor: live but not ready, UNAVAILABLE at once, and back when it returns."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import (
    cpu_executor_args,
    free_port,
    health_status,
    running,
    running_executor_on_port,
    running_scheduler,
    wait_health,
)

GENERATION_SERVICE = "pagewire.v1.Generation"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
RECONNECT_TIMEOUT_SECONDS = 60.0
# The executor process has exited (its Step stream is gone) when this wait starts.
LOSS_DETECTED_WITHIN_SECONDS = 10.0
UNAVAILABLE_WITHIN_SECONDS = 5.0
# EngineConfig.reconnect_grace_seconds: how long the scheduler keeps live requests for a lost executor.
RECONNECT_GRACE_SECONDS = 10.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture
def scheduler() -> Iterator[tuple[str, int]]:
    """A scheduler pointed at a loopback port where nothing listens yet: (its address, that port)."""
    executor_port = free_port()
    with running_scheduler(f"127.0.0.1:{executor_port}") as address:
        yield address, executor_port


def greedy_request(max_tokens: int = 6) -> pb.GenerateRequest:
    """Its prompt fills two KV blocks, so a prefix cache that outlived the executor's KV would show."""
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=list(range(5, 45))),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


@contextlib.contextmanager
def killed_executor(model_dir: Path, port: int) -> Iterator[subprocess.Popen]:
    """An executor on `port`, killed (not stopped) when the block ends or when the test kills it first:
    a graceful stop waits seconds for the scheduler's open Step stream."""
    with running(cpu_executor_args(model_dir, port), f"127.0.0.1:{port}") as process:
        try:
            yield process
        finally:
            process.kill()
            process.wait()


@dataclasses.dataclass
class CutStream:
    """A long request cut by a kill -9 of its executor, mid-stream."""

    stub: pb_grpc.GenerationStub
    request: pb.GenerateRequest  # greedy_request(400)
    reference: list[int]  # its whole answer, served before the kill
    call: Iterator[pb.GenerateResponse]  # the same request again, the one the kill cut
    received: list[int]  # its tokens read before the kill (at least 20)
    killed_at: float  # time.monotonic() right after the kill


@contextlib.contextmanager
def stream_then_kill(address: str, model_dir: Path, executor_port: int,
                     timeout: float) -> Iterator[CutStream]:
    """Starts an executor on `executor_port`, has the scheduler at `address` serve `greedy_request(400)`
    once in full, sends it again (`timeout`: that call's deadline), reads at least 20 tokens of it, then
    kills the executor; the block runs with the call still open."""
    request = greedy_request(max_tokens=400)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with killed_executor(model_dir, executor_port) as executor:
            wait_health(address, GENERATION_SERVICE, SERVING, timeout=RECONNECT_TIMEOUT_SECONDS)
            reference = [t for r in stub.Generate(request, timeout=60) for t in r.token_ids]
            call = stub.Generate(request, timeout=timeout)
            received: list[int] = []
            while len(received) < 20:
                received.extend(next(call).token_ids)
            executor.kill()
            killed_at = time.monotonic()
        yield CutStream(stub, request, reference, call, received, killed_at)


def generate_tokens(address: str) -> list[int]:
    with grpc.insecure_channel(address) as channel:
        responses = list(pb_grpc.GenerationStub(channel).Generate(greedy_request(), timeout=30))
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    tokens = [t for r in responses for t in r.token_ids]
    assert len(tokens) == 6
    return tokens


def server_info(address: str) -> pb.ServerInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)


def assert_unavailable(address: str) -> None:
    """Generate fails fast with UNAVAILABLE (a deadline here would mean the request hung)."""
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(greedy_request(), timeout=UNAVAILABLE_WITHIN_SECONDS))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
    assert "executor" in caught.value.details()
    assert time.monotonic() - started < UNAVAILABLE_WITHIN_SECONDS


def assert_ready_and_idle(address: str) -> None:
    info = server_info(address)
    assert info.executor_ready
    assert (info.num_running, info.num_waiting) == (0, 0)
    assert info.num_free_device_blocks == info.num_device_blocks > 0


def test_scheduler_is_live_but_not_ready_until_its_executor_starts(
    scheduler: tuple[str, int], model_dir: Path
) -> None:
    address, executor_port = scheduler
    assert health_status(address, "") == SERVING
    assert health_status(address, GENERATION_SERVICE) == NOT_SERVING
    assert not server_info(address).executor_ready
    assert_unavailable(address)
    with killed_executor(model_dir, executor_port):
        wait_health(address, GENERATION_SERVICE, SERVING, timeout=RECONNECT_TIMEOUT_SECONDS)
        generate_tokens(address)
        assert_ready_and_idle(address)


def test_scheduler_reconnects_to_a_restarted_executor(scheduler: tuple[str, int], model_dir: Path) -> None:
    address, executor_port = scheduler
    with running_executor_on_port(model_dir, executor_port):
        wait_health(address, GENERATION_SERVICE, SERVING, timeout=RECONNECT_TIMEOUT_SECONDS)
        before = generate_tokens(address)
    wait_health(address, GENERATION_SERVICE, NOT_SERVING, timeout=LOSS_DETECTED_WITHIN_SECONDS)
    assert health_status(address, "") == SERVING
    assert not server_info(address).executor_ready
    assert_unavailable(address)
    with running_executor_on_port(model_dir, executor_port):
        wait_health(address, GENERATION_SERVICE, SERVING, timeout=RECONNECT_TIMEOUT_SECONDS)
        assert generate_tokens(address) == before
        assert_ready_and_idle(address)


def test_request_in_flight_survives_an_executor_crash_and_restart(
    scheduler: tuple[str, int], model_dir: Path
) -> None:
    """Back within the grace period, the executor recomputes the request and the client sees no gap."""
    address, executor_port = scheduler
    with stream_then_kill(address, model_dir, executor_port, timeout=RECONNECT_GRACE_SECONDS + 30) as cut:
        # Proof that the crash hit the request mid-stream: only a failed step can notice it here.
        wait_health(address, GENERATION_SERVICE, NOT_SERVING, timeout=LOSS_DETECTED_WITHIN_SECONDS)
        with killed_executor(model_dir, executor_port):
            rest = list(cut.call)
            assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert cut.received + [t for r in rest for t in r.token_ids] == cut.reference
            assert_ready_and_idle(address)


def test_request_sent_right_after_the_executor_stopped_does_not_hang(
    scheduler: tuple[str, int], model_dir: Path
) -> None:
    """Whether the scheduler noticed the loss yet or not, the request ends: UNAVAILABLE, or served by
    the executor that is back within the grace period."""
    address, executor_port = scheduler
    with running_executor_on_port(model_dir, executor_port):
        wait_health(address, GENERATION_SERVICE, SERVING, timeout=RECONNECT_TIMEOUT_SECONDS)
        before = generate_tokens(address)

    def outcome() -> list[int] | grpc.StatusCode:
        try:
            with grpc.insecure_channel(address) as channel:
                responses = list(pb_grpc.GenerationStub(channel).Generate(
                    greedy_request(), timeout=RECONNECT_GRACE_SECONDS + 5))
            return [t for r in responses for t in r.token_ids]
        except grpc.RpcError as error:
            return error.code()

    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(outcome)
        with running_executor_on_port(model_dir, executor_port):
            result = pending.result()
            assert result in (grpc.StatusCode.UNAVAILABLE, before)
            wait_health(address, GENERATION_SERVICE, SERVING, timeout=RECONNECT_TIMEOUT_SECONDS)
            assert generate_tokens(address) == before
            assert_ready_and_idle(address)


def test_kill_9_without_restart_ends_the_request_unavailable_after_the_grace_then_recovers(
    model_dir: Path,
) -> None:
    """An executor killed mid-stream and not back within --reconnect-grace-seconds (2 here): the stream
    ends with UNAVAILABLE naming the executor within the grace plus a few seconds, after the tokens it
    already had (no token repeated or wrong); new requests fail fast meanwhile; an executor started
    later serves the same request again from the start, and every block is free after."""
    executor_port = free_port()
    with (
        running_scheduler(f"127.0.0.1:{executor_port}", "--reconnect-grace-seconds", "2") as address,
        stream_then_kill(address, model_dir, executor_port, timeout=60) as cut,
    ):
        with pytest.raises(grpc.RpcError) as caught:
            for response in cut.call:
                cut.received.extend(response.token_ids)
        ended_after = time.monotonic() - cut.killed_at
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert "executor" in caught.value.details()
        assert ended_after < 2 + LOSS_DETECTED_WITHIN_SECONDS
        assert 20 <= len(cut.received) < 400 and cut.received == cut.reference[:len(cut.received)]
        assert_unavailable(address)
        with killed_executor(model_dir, executor_port):
            wait_health(address, GENERATION_SERVICE, SERVING, timeout=RECONNECT_TIMEOUT_SECONDS)
            again = cut.stub.Generate(cut.request, timeout=60)
            assert [t for r in again for t in r.token_ids] == cut.reference
            assert_ready_and_idle(address)
