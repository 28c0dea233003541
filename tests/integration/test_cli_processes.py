"""The `pagewire` command as a user runs it, as real processes: failed starts end cleanly with the
reason, `serve` hands its executor the scheduler's limits and dies with it, impossible settings exit 2,
`generate` waits for a loading server and says when nothing listens, `--seed`, `--api-key`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from executor_service.tiny_model import create_tiny_model
from shared.child_process import stop_child
from shared.pb.pagewire.v1 import executor_pb2, executor_pb2_grpc
from tests.helpers.processes import REPO_ROOT, free_port, running_executor, running_executor_on_port, running_server

PAGEWIRE = [sys.executable, "-m", "pagewire"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("cli") / "tiny", seed=0)


def run_pagewire(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PAGEWIRE, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env)


def log_events(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def assert_clean_failure(stderr: str) -> None:
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr, stderr[-3000:]


def test_an_executor_that_cannot_load_exits_2_with_one_error_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    done = run_pagewire("executor", "--model", str(bad), "--device", "cpu", "--port", str(free_port()))
    assert done.returncode == 2
    assert_clean_failure(done.stderr)
    errors = [line for line in done.stderr.splitlines() if line.startswith("pagewire executor: error:")]
    assert len(errors) == 1 and f"cannot load the model {bad}: unsupported model architecture" in errors[0]
    assert [e["event"] for e in log_events(done.stderr) if e["level"] == "error"] == ["executor_load_failed"]


def test_serve_whose_executor_cannot_load_exits_1_with_the_executors_error(tmp_path: Path) -> None:
    started = time.monotonic()
    done = run_pagewire(
        "serve", "--model", str(tmp_path / "missing"), "--device", "cpu", "--port", str(free_port()),
        "--executor-port", str(free_port()), "--http-port", "0", timeout=90,
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 60
    assert_clean_failure(done.stderr)
    assert f"pagewire executor: error: cannot load the model {tmp_path / 'missing'}" in done.stderr
    exited = [e for e in log_events(done.stderr) if e["event"] == "executor_exited"]
    assert len(exited) == 1 and exited[0]["returncode"] == 2


def _describe(address: str, token: str | None = None) -> executor_pb2.ExecutorDescription:
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        return executor_pb2_grpc.ExecutorStub(channel).Describe(
            executor_pb2.DescribeRequest(), timeout=10, metadata=metadata
        )


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def test_serve_forwards_batch_limits_warns_when_the_executor_lowers_one_and_exits_when_it_dies(
    model_dir: Path, tmp_path: Path
) -> None:
    port, executor_port = free_port(), free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        serve = subprocess.Popen(
            [*PAGEWIRE, "serve", "--model", str(model_dir), "--device", "cpu", "--num-threads", "1",
             "--port", str(port), "--executor-port", str(executor_port), "--http-port", "0",
             "--max-num-seqs", "512", "--executor-args", "--max-num-batched-tokens 1024"],
            cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True,
            env=dict(os.environ, PAGEWIRE_EXECUTOR_TOKEN="serve-test-token"),
        )
    try:
        def connected() -> bool:
            assert serve.poll() is None, log_path.read_text()[-3000:]
            return any(e["event"] == "executor_connected" for e in log_events(log_path.read_text()))

        _wait_for(connected, 120, "serve never connected to its executor")
        with pytest.raises(grpc.RpcError) as refused:
            _describe(f"127.0.0.1:{executor_port}")  # the executor hop needs serve's token
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        description = _describe(f"127.0.0.1:{executor_port}", "serve-test-token")
        # The scheduler's --max-num-seqs reached the executor (its own default is 256);
        # --executor-args came last and won for the batched tokens.
        assert (description.max_num_seqs, description.max_num_batched_tokens) == (512, 1024)
        warnings = [e for e in log_events(log_path.read_text()) if e["event"] == "executor_limit_lowers_setting"]
        assert [(w["setting"], w["requested"], w["executor_limit"]) for w in warnings] == [
            ("max_num_batched_tokens", 2048, 1024)
        ]
        executor_pid = next(e["pid"] for e in log_events(log_path.read_text()) if e["event"] == "executor_started")
        os.kill(executor_pid, signal.SIGKILL)
        assert serve.wait(timeout=60) == 1
    finally:
        stop_child(serve)
    stderr = log_path.read_text()
    assert_clean_failure(stderr)
    exited = [e for e in log_events(stderr) if e["event"] == "executor_exited"]
    assert len(exited) == 1 and exited[0]["returncode"] == -signal.SIGKILL


def test_a_first_executor_too_small_for_max_model_len_makes_the_scheduler_exit_2(model_dir: Path) -> None:
    with running_executor(model_dir, "--num-gpu-blocks-override", "4") as executor_address:
        started = time.monotonic()
        done = run_pagewire(
            "scheduler", "--executor", executor_address, "--port", str(free_port()), "--http-port", "0", timeout=60
        )
    assert done.returncode == 2
    assert time.monotonic() - started < 30
    assert_clean_failure(done.stderr)
    assert f"pagewire scheduler: error: the executor at {executor_address} cannot serve: the KV pool of 4 blocks" \
        in done.stderr
    assert "give the executor more KV cache memory or lower max_model_len" in done.stderr


def test_generate_against_nothing_says_so_within_seconds() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = run_pagewire("generate", "hello", "--address", address, timeout=60)
    assert done.returncode == 1
    assert time.monotonic() - started < 15
    assert f"pagewire generate: nothing listens at {address}" in done.stderr


def test_generate_waits_for_a_server_whose_executor_is_still_starting_and_retries_are_logged(
    model_dir: Path, tmp_path: Path
) -> None:
    port, executor_port = free_port(), free_port()
    log_path = tmp_path / "scheduler.log"
    with log_path.open("w") as log:
        scheduler = subprocess.Popen(
            [*PAGEWIRE, "scheduler", "--executor", f"127.0.0.1:{executor_port}", "--port", str(port),
             "--http-port", "0"], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=log,
        )
    generate = None
    try:
        _wait_for(lambda: "scheduler_listening" in log_path.read_text(), 60, "scheduler did not start")
        generate = subprocess.Popen(
            [*PAGEWIRE, "generate", "hello", "--address", f"127.0.0.1:{port}", "--max-tokens", "4",
             "--ignore-eos", "--timeout", "120"], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(4)
        assert generate.poll() is None, generate.communicate()
        retries = [e for e in log_events(log_path.read_text()) if e["event"] == "executor_connect_retry"]
        assert len(retries) >= 2 and [r["attempt"] for r in retries[:2]] == [1, 2]
        assert retries[0]["address"] == f"127.0.0.1:{executor_port}"
        with running_executor_on_port(model_dir, executor_port):
            out, err = generate.communicate(timeout=120)
        assert generate.returncode == 0, err
        assert err.strip().startswith("[length: ") and err.strip().endswith(" + 4 completion tokens]")
    finally:
        if generate is not None and generate.poll() is None:
            generate.kill()
        stop_child(scheduler)


@pytest.fixture(scope="module")
def keyed_server(model_dir: Path) -> Iterator[str]:
    with running_server(model_dir, scheduler_args=("--api-key", "sesame")) as address:
        yield address


@pytest.mark.parametrize(
    ("flags", "env_key", "returncode"),
    [((), None, 1), (("--api-key", "sesame"), None, 0), ((), "sesame", 0), (("--api-key", "wrong"), None, 1)],
)
def test_generate_sends_the_api_key_from_the_flag_or_the_environment(
    keyed_server: str, flags: tuple[str, ...], env_key: str | None, returncode: int
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PAGEWIRE_API_KEY"}
    if env_key is not None:
        env["PAGEWIRE_API_KEY"] = env_key
    done = run_pagewire("generate", "hi", "--address", keyed_server, "--max-tokens", "2", *flags, env=env)
    assert done.returncode == returncode, done.stderr
    if returncode:
        assert "pagewire generate: UNAUTHENTICATED" in done.stderr


def _sampled_text(address: str) -> str:
    done = run_pagewire("generate", "once upon", "--address", address, "--temperature", "1.0",
                        "--max-tokens", "24", "--ignore-eos")
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_executor_seed_makes_unseeded_sampling_repeatable_across_restarts(model_dir: Path) -> None:
    texts = []
    for seed in ("7", "7", "8"):
        with running_server(model_dir, executor_args=("--seed", seed)) as address:
            texts.append(_sampled_text(address))
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
