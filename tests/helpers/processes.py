"""Starts pagewire services as real processes on free loopback ports and stops them cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.child_process import stop_child

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def health_status(address: str, service: str = "", timeout: float = 1.0,
                  credentials: grpc.ChannelCredentials | None = None) -> int | None:
    """The health service's answer for `service` (over TLS with `credentials`), or None when the server
    does not answer."""
    try:
        channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
    except grpc.RpcError:
        return None


def wait_serving(address: str, process: subprocess.Popen, service: str = "", timeout: float = 120.0,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before serving on {address}")
        if health_status(address, service, credentials=credentials) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{address} was not SERVING within {timeout} s")


@contextlib.contextmanager
def running(args: list[str], address: str, service: str = "", timeout: float = 120.0,
            credentials: grpc.ChannelCredentials | None = None) -> Iterator[subprocess.Popen]:
    """Runs `pagewire ARGS...` until the block ends; SIGTERM then, and kill if it lingers. Its health is
    asked over TLS with `credentials`.

    The service's stderr goes to a temporary file (a pipe read only at exit would fill up and block
    a chatty service); its tail is printed when the service did not exit cleanly.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile(mode="w+") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "pagewire", *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            text=True,
        )
        try:
            wait_serving(address, process, service, timeout, credentials)
            yield process
        finally:
            stop_child(process)
            if process.returncode not in (0, -signal.SIGTERM):
                log_file.seek(0)
                print(log_file.read()[-5000:], file=sys.stderr)


@contextlib.contextmanager
def running_executor(model_dir: str | Path, *extra: str) -> Iterator[str]:
    """An executor process serving `model_dir` on CPU on a free port; yields its address once SERVING."""
    with running_executor_on_port(model_dir, free_port(), *extra) as address:
        yield address


@contextlib.contextmanager
def running_server(
    model_dir: str | Path, executor_args: tuple[str, ...] = (), scheduler_args: tuple[str, ...] = ()
) -> Iterator[str]:
    """An executor and a scheduler process; yields the scheduler's address once it is ready."""
    with running_executor(model_dir, *executor_args) as executor_address:
        port = free_port()
        address = f"127.0.0.1:{port}"
        args = ["scheduler", "--executor", executor_address, "--port", str(port), "--http-port", "0", *scheduler_args]
        with running(args, address, service="pagewire.v1.Generation"):
            yield address


def wait_health(address: str, service: str, status: int, timeout: float = 60.0) -> None:
    """Polls the health service until `service` reports `status`; raises TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    last: int | None = None
    while time.monotonic() < deadline:
        last = health_status(address, service)
        if last == status:
            return
        time.sleep(0.1)
    raise TimeoutError(f"{address} health of {service!r} stayed {last}, not {status}, for {timeout} s")


def cpu_executor_args(model_dir: str | Path, port: int, *extra: str) -> list[str]:
    """`pagewire` arguments of a one-thread CPU executor serving `model_dir` on `port`."""
    return ["executor", "--model", str(model_dir), "--port", str(port), "--device", "cpu", "--num-threads", "1",
            *extra]


@contextlib.contextmanager
def running_executor_on_port(model_dir: str | Path, port: int, *extra: str) -> Iterator[str]:
    """Like `running_executor`, on a port the caller chose (e.g. one a scheduler already points at)."""
    address = f"127.0.0.1:{port}"
    with running(cpu_executor_args(model_dir, port, *extra), address):
        yield address


@contextlib.contextmanager
def running_scheduler(executor_address: str, *extra: str) -> Iterator[str]:
    """A scheduler process; yields its address once it is live (health ""), whether or not it is ready."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    with running(["scheduler", "--executor", executor_address, "--port", str(port), "--http-port", "0", *extra], address):
        yield address
