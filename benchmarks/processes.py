"""Starts pagewire's executor and scheduler as real processes for a benchmark, and stops them."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.child_process import stop_child

REPO_ROOT = Path(__file__).resolve().parents[1]
GENERATION_SERVICE = "pagewire.v1.Generation"
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _is_serving(address: str, service: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
    except grpc.RpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


@contextlib.contextmanager
def _running(
    args: Sequence[str], address: str, service: str, log_path: Path, timeout_s: float
) -> Iterator[None]:
    """Runs `pagewire ARGS` with output to `log_path` until the block ends; raises with the log's tail
    when it exits or is not SERVING within `timeout_s`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagewire", "--log-level", "warning", *args],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while not _is_serving(address, service):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text()[-3000:]
                raise RuntimeError(f"`pagewire {' '.join(args)}` did not start serving on {address}:\n{tail}")
            time.sleep(0.2)
        yield
    finally:
        stop_child(process, STOP_TIMEOUT_S)


@contextlib.contextmanager
def running_executor(
    model_dir: Path, num_threads: int, extra_args: Sequence[str], log_dir: Path, timeout_s: float = 300.0
) -> Iterator[str]:
    """A CPU executor serving `model_dir` with `num_threads` torch threads; yields its address."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    args = [
        "executor",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--num-threads",
        str(num_threads),
        *extra_args,
    ]
    with _running(args, address, "", log_dir / f"executor-{port}.log", timeout_s):
        yield address


@contextlib.contextmanager
def running_scheduler(
    executor_address: str, extra_args: Sequence[str], log_dir: Path, timeout_s: float = 120.0
) -> Iterator[str]:
    """A scheduler over `executor_address`; yields its address once connected to the executor."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    args = ["scheduler", "--executor", executor_address, "--port", str(port), "--http-port", "0", *extra_args]
    with _running(args, address, GENERATION_SERVICE, log_dir / f"scheduler-{port}.log", timeout_s):
        yield address
