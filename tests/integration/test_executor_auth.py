"""The executor hop's secret (--executor-token): without it, or with another, Describe and Step are
UNAUTHENTICATED and health still answers; a scheduler with the wrong token fails its start-up with the
reason; `pagewire serve` makes a random one by default and keeps it off the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import executor_pb2, executor_pb2_grpc
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import REPO_ROOT, free_port, health_status, running_executor, running_scheduler

TOKEN = "correct-horse-battery-staple"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("auth") / "tiny", seed=0)


def describe(address: str, token: str | None) -> executor_pb2.ExecutorDescription:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        return executor_pb2_grpc.ExecutorStub(channel).Describe(executor_pb2.DescribeRequest(), timeout=10,
                                                                 metadata=metadata)


def open_step(address: str, token: str | None) -> grpc.RpcError:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        stream = executor_pb2_grpc.ExecutorStub(channel).Step(iter([executor_pb2.StepPlan(step_id=1)]),
                                                             timeout=10, metadata=metadata)
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
    return caught.value


def test_an_executor_with_a_token_refuses_callers_without_it(model_dir: Path) -> None:
    with running_executor(model_dir, "--executor-token", TOKEN) as address:
        for token, message in ((None, "missing executor token"), ("wrong", "invalid executor token")):
            with pytest.raises(grpc.RpcError) as caught:
                describe(address, token)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert message in caught.value.details() and TOKEN not in caught.value.details()
            step_error = open_step(address, token)
            assert step_error.code() is grpc.StatusCode.UNAUTHENTICATED
        assert health_status(address, "pagewire.v1.Executor") == health_pb2.HealthCheckResponse.SERVING
        assert describe(address, TOKEN).model.vocab_size > 0


def test_a_scheduler_with_the_token_serves_and_one_with_another_exits_2(model_dir: Path) -> None:
    with running_executor(model_dir, "--executor-token", TOKEN) as executor_address:
        with running_scheduler(executor_address, "--executor-token", TOKEN) as address:
            deadline = time.monotonic() + 60
            while health_status(address, "pagewire.v1.Generation") != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                         sampling=pb.SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
            with grpc.insecure_channel(address) as channel:
                responses = list(pb_grpc.GenerationStub(channel).Generate(request, timeout=60))
            assert sum(len(r.token_ids) for r in responses) == 3
        done = subprocess.run(
            [sys.executable, "-m", "pagewire", "scheduler", "--executor", executor_address, "--port",
             str(free_port()), "--http-port", "0"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
            env={k: v for k, v in os.environ.items() if k != "PAGEWIRE_EXECUTOR_TOKEN"} | {
                "PAGEWIRE_EXECUTOR_TOKEN": "not-it"},
        )
    assert done.returncode == 2
    assert "refused this scheduler's executor token: invalid executor token" in done.stderr
    assert "not-it" not in done.stderr and TOKEN not in done.stderr


def test_serve_authenticates_the_executor_hop_by_default_with_no_secret_on_argv(model_dir: Path, tmp_path: Path) -> None:
    port, executor_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PAGEWIRE_EXECUTOR_TOKEN"}
    with log_path.open("w") as log:
        serve = subprocess.Popen(
            [sys.executable, "-m", "pagewire", "serve", "--model", str(model_dir), "--device", "cpu",
             "--num-threads", "1", "--port", str(port), "--executor-port", str(executor_port), "--http-port", "0"],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True, env=env,
        )
    try:
        deadline = time.monotonic() + 120
        while health_status(f"127.0.0.1:{port}", "pagewire.v1.Generation") != health_pb2.HealthCheckResponse.SERVING:
            assert serve.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as caught:
            describe(f"127.0.0.1:{executor_port}", None)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        started = next(json.loads(line) for line in log_path.read_text().splitlines()
                       if line.startswith("{") and '"executor_started"' in line)
        assert "--executor-token" not in started["command"]
        with open(f"/proc/{started['pid']}/cmdline", "rb") as cmdline:
            assert b"--executor-token" not in cmdline.read()
    finally:
        serve.terminate()
        serve.wait(timeout=60)
