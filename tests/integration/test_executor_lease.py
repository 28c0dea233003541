"""Two schedulers, one executor: one owner at a time, the other refused with the owner named, the lease
passing on after the owner dies, and a restarted scheduler with the same id reclaiming it at once. Two
schedulers, three executors: they divide the set (two and one), never share an executor, and the
survivor of a kill -9 takes the dead one's executors once their leases run out.

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
    executor_address: str | list[str], scheduler_id: str, log_path: Path
) -> Iterator[tuple[str, subprocess.Popen]]:
    """A scheduler process (driving one executor or several) logging to `log_path`; yields (its address,
    the process) once it is live."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    executors = [executor_address] if isinstance(executor_address, str) else executor_address
    args = ["--log-format", "json", "scheduler", *(a for e in executors for a in ("--executor", e)),
            "--port", str(port), "--http-port", "0", "--scheduler-id", scheduler_id]
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


def owned(address: str) -> set[str]:
    return {e.address for e in server_info(address).executors if e.ready}


def wait_owned(address: str, count: int, timeout: float) -> set[str]:
    deadline = time.monotonic() + timeout
    while len(held := owned(address)) != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{address} holds {sorted(held)}, not {count} executors, after {timeout} s")
        time.sleep(0.2)
    return held


def test_two_schedulers_divide_three_executors_and_the_survivor_of_a_kill_9_takes_them_all(tmp_path):
    with contextlib.ExitStack() as stack:
        executors = [stack.enter_context(simulated_executor(tmp_path, LEASE_SECONDS)) for _ in range(3)]
        first, first_process = stack.enter_context(scheduler(executors, "first", tmp_path / "first.log"))
        wait_owned(first, 3, timeout=30)
        tokens = generate(first)
        second, _ = stack.enter_context(scheduler(executors, "second", tmp_path / "second.log"))
        # The first one sees the second ask, holds more than ceil(3 / 2), and gives one executor up.
        given = wait_owned(second, 1, timeout=SLACK_SECONDS + 10)
        kept = wait_owned(first, 2, timeout=10)
        assert given.isdisjoint(kept) and given | kept == set(executors)
        assert "executor_share_exceeded" in (tmp_path / "first.log").read_text()
        for _ in range(3):  # settled: no executor changes hands back and forth
            time.sleep(1.0)
            assert (owned(first), owned(second)) == (kept, given)
        assert generate(first) == tokens and generate(second) == tokens
        first_process.kill()
        first_process.wait()
        wait_owned(second, 3, timeout=LEASE_SECONDS + SLACK_SECONDS)
        assert generate(second) == tokens


def test_three_schedulers_on_three_executors_end_with_one_each(tmp_path):
    """The first holds all three; the two that start later each get one. A scheduler at its share takes
    no free executor but keeps asking, so every owner keeps counting it among the schedulers."""
    with contextlib.ExitStack() as stack:
        executors = [stack.enter_context(simulated_executor(tmp_path, LEASE_SECONDS)) for _ in range(3)]
        first, _ = stack.enter_context(scheduler(executors, "first", tmp_path / "first.log"))
        wait_owned(first, 3, timeout=30)
        others = [stack.enter_context(scheduler(executors, name, tmp_path / f"{name}.log"))[0]
                  for name in ("second", "third")]
        schedulers = (first, *others)
        deadline = time.monotonic() + SLACK_SECONDS + 20
        while True:  # executors may change hands a few times on the way (see fair_share.py)
            held = [owned(address) for address in schedulers]
            if [len(h) for h in held] == [1, 1, 1] and set().union(*held) == set(executors):
                time.sleep(2.0)
                if [owned(address) for address in schedulers] == held:
                    break
            assert time.monotonic() < deadline, f"not one each after {SLACK_SECONDS + 20} s: {held}"
            time.sleep(0.2)
        tokens = generate(first)
        assert all(generate(address) == tokens for address in others)
