"""Two schedulers, one executor: one owner at a time, the other refused with the owner named, the lease
passing on after the owner dies, and a restarted scheduler with the same id reclaiming it at once.

The executor is a simulated one (`--simulate cpu_tiny`): the real Executor service and lease with no
model, so the test pays for no weights and runs in seconds.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from shared.child_process import stop_child
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import REPO_ROOT, free_port, health_status, running, wait_health

GENERATION_SERVICE = "pagewire.v1.Generation"
SERVING = health_pb2.HealthCheckResponse.SERVING
LEASE_SECONDS = 4.0
# Long enough that a scheduler process reclaiming inside it cannot be a lease that ran out.
LONG_LEASE_SECONDS = 30.0
# Start-up of a scheduler process and its connect retries, on top of the lease.
SLACK_SECONDS = 15.0


@contextlib.contextmanager
def simulated_executor(tmp_path: Path, lease_seconds: float) -> Iterator[str]:
    port = free_port()
    address = f"127.0.0.1:{port}"
    args = ["executor", "--simulate", "cpu_tiny", "--port", str(port),
            "--executor-lease-seconds", str(lease_seconds)]
    with _cache_env(tmp_path), running(args, address):
        yield address


@contextlib.contextmanager
def _cache_env(tmp_path: Path) -> Iterator[None]:
    previous = os.environ.get("PAGEWIRE_CACHE")
    os.environ["PAGEWIRE_CACHE"] = str(tmp_path / "cache")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("PAGEWIRE_CACHE")
        else:
            os.environ["PAGEWIRE_CACHE"] = previous


@contextlib.contextmanager
def scheduler(
    executor_address: str, scheduler_id: str, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A scheduler process logging to `log_path`; yields (its address, the process) once it is live."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    args = ["--log-format", "json", "scheduler", "--executor", executor_address, "--port", str(port),
            "--http-port", "0", "--scheduler-id", scheduler_id]
    with log_path.open("w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "pagewire", *args], cwd=REPO_ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.DEVNULL, stderr=log_file)
        try:
            wait_health(address, "", SERVING, timeout=60)
            yield address, process
        finally:
            stop_child(process)


def server_info(address: str) -> pb.ServerInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)


def generate(address: str) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(5, 25))),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    with grpc.insecure_channel(address) as channel:
        responses = list(pb_grpc.GenerationStub(channel).Generate(request, timeout=30))
    return [t for r in responses for t in r.token_ids]


def wait_for_text(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} not in {path}:\n{path.read_text()[-3000:]}")


def test_a_second_scheduler_is_refused_then_takes_over_within_the_lease_after_a_kill_9(tmp_path):
    with (
        simulated_executor(tmp_path, LEASE_SECONDS) as executor,
        scheduler(executor, "first", tmp_path / "first.log") as (first, first_process),
    ):
        wait_health(first, GENERATION_SERVICE, SERVING, timeout=30)
        tokens = generate(first)
        with scheduler(executor, "second", tmp_path / "second.log") as (second, _):
            wait_for_text(tmp_path / "second.log", "owned by scheduler 'first'", timeout=30)
            assert not server_info(second).executor_ready
            assert health_status(second, GENERATION_SERVICE) != SERVING
            assert generate(first) == tokens  # the owner is undisturbed
            first_process.kill()  # kill -9: no goodbye, the executor sees the connection drop
            first_process.wait()
            killed_at = time.monotonic()
            wait_health(second, GENERATION_SERVICE, SERVING, timeout=LEASE_SECONDS + SLACK_SECONDS)
            assert time.monotonic() - killed_at >= LEASE_SECONDS - 0.5  # not before the lease ran out
            assert server_info(second).executor_ready
            # Deterministic tokens: the same prompt gives the same answer through the new owner.
            assert generate(second) == tokens


def test_a_restarted_scheduler_with_the_same_id_reclaims_its_executor_at_once(tmp_path):
    with simulated_executor(tmp_path, LONG_LEASE_SECONDS) as executor:
        with scheduler(executor, "steady", tmp_path / "a.log") as (address, process):
            wait_health(address, GENERATION_SERVICE, SERVING, timeout=30)
            tokens = generate(address)
            process.kill()
            process.wait()
        started = time.monotonic()
        with scheduler(executor, "steady", tmp_path / "b.log") as (address, _):
            wait_health(address, GENERATION_SERVICE, SERVING, timeout=LONG_LEASE_SECONDS - 5)
            # Inside the lease of an owner that never came back: only the same id gets in this early.
            assert time.monotonic() - started < LONG_LEASE_SECONDS
            assert generate(address) == tokens
        assert "owned by" not in (tmp_path / "b.log").read_text()

