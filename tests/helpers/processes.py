"""Starts pagewire services as real processes on free loopback ports and stops them cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health_status(address: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The health service's answer for `service`, or None when the server does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
    except grpc.RpcError:
        return None


def wait_serving(address: str, process: subprocess.Popen, service: str = "", timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before serving on {address}")
        if health_status(address, service) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} was not SERVING within {timeout} s")


@contextlib.contextmanager
def running(args: list[str], address: str, service: str = "", timeout: float = 120.0) -> Iterator[subprocess.Popen]:
    """Runs `pagewire ARGS...` until the block ends; SIGTERM then, and kill if it lingers."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(address, process, service, timeout)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stderr = process.stderr.read() if process.stderr else ""
        if process.returncode not in (0, -signal.SIGTERM):
            print(stderr[-5000:], file=sys.stderr)


@contextlib.contextmanager
def running_executor(model_dir: str | Path, *extra: str) -> Iterator[str]:
    """An executor process serving `model_dir` on CPU; yields its address once SERVING."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    args = ["executor", "--model", str(model_dir), "--port", str(port), "--device", "cpu", "--num-threads", "1", *extra]
    with running(args, address):
        yield address


@contextlib.contextmanager
def running_server(
    model_dir: str | Path, executor_args: tuple[str, ...] = (), scheduler_args: tuple[str, ...] = ()
) -> Iterator[str]:
    """An executor and a scheduler process; yields the scheduler's address once it is ready."""
    with running_executor(model_dir, *executor_args) as executor_address:
        port = free_port()
        address = f"127.0.0.1:{port}"
        args = ["scheduler", "--executor", executor_address, "--port", str(port), *scheduler_args]
        with running(args, address, service="pagewire.v1.Generation"):
            yield address
