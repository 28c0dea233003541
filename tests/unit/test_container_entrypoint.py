"""What runs inside the containers, run here as real processes: the entrypoint (executor token from a file,
the tiny model on first start), compose's executor-token writer and its health probe."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from executor_service.tiny_model import create_tiny_model
from shared.bearer_auth import EXECUTOR_TOKEN_ENV
from shared.child_process import stop_child
from shared.pb.pagewire.v1 import executor_pb2, executor_pb2_grpc
from tests.helpers.compose_files import BASE_FILE, ENTRYPOINT, load_compose
from tests.helpers.processes import free_port

TOKEN_FILE_ENV = "PAGEWIRE_EXECUTOR_TOKEN_FILE"


@pytest.fixture(scope="module")
def base() -> dict:
    return load_compose(BASE_FILE)


def entrypoint_environment(tiny_model: Path, **extra: str) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "pagewire").is_file():
        pytest.skip(f"the pagewire console script is not installed in {bin_dir}")
    path = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    unset = (EXECUTOR_TOKEN_ENV, TOKEN_FILE_ENV)
    environment = {name: value for name, value in os.environ.items() if name not in unset}
    return dict(environment, PATH=path, PAGEWIRE_TINY_MODEL=str(tiny_model), PYTHONUNBUFFERED="1", **extra)


def write_token(base: dict, path: Path) -> subprocess.CompletedProcess[str]:
    """Runs compose's executor-token writer (its entrypoint script) for `path`."""
    script = base["services"]["executor-token"]["entrypoint"][2]
    return subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                          timeout=60)


def probe(base: dict, service_name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs the compose healthcheck's probe script with `args` (ADDRESS SERVICE [URL...])."""
    script = base["services"][service_name]["healthcheck"]["test"][3]
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def serving(
    command: list[str], environment: dict[str, str], log_path: Path, is_ready: Callable[[], bool]
) -> Iterator[None]:
    """Runs `sh ENTRYPOINT SUBCOMMAND ...` until the block ends, entering it once `is_ready()`.

    Output goes to `log_path` (a pipe nobody drains could fill and stall the server). On exit: SIGTERM,
    then kill if it lingers.
    """
    subcommand = command[2]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=environment, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120.0
        while not is_ready():
            if process.poll() is not None:
                pytest.fail(f"{subcommand} exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"{subcommand} was not ready within 120 s"
            time.sleep(0.3)
        yield
    finally:
        stop_child(process)


def describe_code(address: str) -> grpc.StatusCode:
    """The status of an executor Describe sent without a token."""
    with grpc.insecure_channel(address) as channel:
        try:
            executor_pb2_grpc.ExecutorStub(channel).Describe(executor_pb2.DescribeRequest(), timeout=30)
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_the_writer_makes_one_random_token_readable_by_its_owner_and_keeps_it(
    base: dict, tmp_path: Path
) -> None:
    first = write_token(base, tmp_path / "token")
    assert (first.returncode, first.stdout.strip()) == (
        0, f"wrote a new executor token to {tmp_path / 'token'}")
    token = (tmp_path / "token").read_text()
    assert len(token) == 43 and token.replace("-", "").replace("_", "").isalnum()
    assert stat.S_IMODE((tmp_path / "token").stat().st_mode) == 0o400
    again = write_token(base, tmp_path / "token")
    assert (again.returncode, again.stdout) == (0, "")
    assert (tmp_path / "token").read_text() == token
    other = write_token(base, tmp_path / "other")
    assert other.returncode == 0 and (tmp_path / "other").read_text() != token


@pytest.mark.parametrize("content", [None, ""])
def test_a_named_token_file_that_is_missing_or_empty_stops_the_start(
    tmp_path: Path, content: str | None
) -> None:
    token_file = tmp_path / "token"
    if content is not None:
        token_file.write_text(content)
    environment = entrypoint_environment(tmp_path / "tiny", **{TOKEN_FILE_ENV: str(token_file)})
    run = subprocess.run(["sh", str(ENTRYPOINT), "executor", "--model", str(tmp_path / "tiny")],
                         env=environment, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith(
        f"pagewire-entrypoint: the executor token file {token_file} is missing or empty")
    assert not (tmp_path / "tiny").exists(), "nothing may start (or be created) without the token"


def test_entrypoint_creates_the_tiny_model_shares_the_token_and_the_probes_track_health(
    base: dict, tmp_path: Path
) -> None:
    tiny_model = tmp_path / "models" / "tiny"
    assert write_token(base, tmp_path / "executor-token").returncode == 0
    environment = entrypoint_environment(tiny_model, **{TOKEN_FILE_ENV: str(tmp_path / "executor-token")})
    executor_address = f"127.0.0.1:{free_port()}"
    scheduler_address = f"127.0.0.1:{free_port()}"
    health_url = f"http://127.0.0.1:{free_port()}/health"
    executor = [
        "sh", str(ENTRYPOINT), "executor", f"--model={tiny_model}/", "--host", "127.0.0.1",
        "--port", executor_address.rsplit(":", 1)[1], "--device", "cpu",
        "--num-gpu-blocks-override", "64", "--swap-space", "0.01",
    ]
    scheduler = [
        "sh", str(ENTRYPOINT), "scheduler", "--executor", executor_address, "--host", "127.0.0.1",
        "--port", scheduler_address.rsplit(":", 1)[1], "--max-model-len", "512",
        "--http-port", health_url.split(":")[2].split("/")[0],
    ]
    with serving(
        executor,
        environment,
        tmp_path / "executor.log",
        lambda: probe(base, "executor", executor_address, "").returncode == 0,
    ):
        reference = create_tiny_model(tmp_path / "reference", seed=0)
        files = sorted(path.name for path in tiny_model.iterdir())
        assert files == sorted(path.name for path in reference.iterdir())
        for name in files:
            assert (tiny_model / name).read_bytes() == (reference / name).read_bytes(), name
        assert [path.name for path in tiny_model.parent.iterdir()] == ["tiny"], "a staging directory was left"
        assert probe(base, "executor", executor_address, "pagewire.v1.Executor").returncode == 0
        missing = probe(base, "executor", executor_address, "pagewire.v1.Generation")
        assert (missing.returncode, missing.stderr.strip()) == (
            1, f"{executor_address} 'pagewire.v1.Generation': NOT_FOUND"
        )
        # The token from the file guards the executor: a client without it is refused ...
        assert describe_code(executor_address) == grpc.StatusCode.UNAUTHENTICATED
        # ... and the scheduler, given the same file, is served (it turns healthy on gRPC and HTTP).
        with serving(
            scheduler,
            environment,
            tmp_path / "scheduler.log",
            lambda: probe(
                base, "scheduler", scheduler_address, "pagewire.v1.Generation", health_url).returncode == 0,
        ):
            assert probe(base, "scheduler", scheduler_address, "").returncode == 0
            nowhere = health_url.replace("/health", "/nowhere")
            wrong_url = probe(base, "scheduler", scheduler_address, "", nowhere)
            assert (wrong_url.returncode, wrong_url.stderr.strip()) == (
                1, f"{nowhere}: HTTP Error 404: Not Found")
    closed = probe(base, "scheduler", scheduler_address, "pagewire.v1.Generation")
    assert (closed.returncode, closed.stderr.strip()) == (
        1, f"{scheduler_address} 'pagewire.v1.Generation': UNAVAILABLE"
    )


def test_an_environment_token_wins_over_the_file(tmp_path: Path) -> None:
    """PAGEWIRE_EXECUTOR_TOKEN set: the file is not read, so a missing one does not stop the start."""
    elsewhere = tmp_path / "elsewhere"
    environment = entrypoint_environment(
        tmp_path / "tiny", **{EXECUTOR_TOKEN_ENV: "by-hand", TOKEN_FILE_ENV: str(tmp_path / "absent")})
    run = subprocess.run(["sh", str(ENTRYPOINT), "create-tiny-model", str(elsewhere)],
                         env=environment, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(elsewhere)


def test_entrypoint_passes_other_commands_through_untouched(tmp_path: Path) -> None:
    tiny_model = tmp_path / "models" / "tiny"
    elsewhere = tmp_path / "elsewhere"
    run = subprocess.run(
        ["sh", str(ENTRYPOINT), "create-tiny-model", str(elsewhere)],
        env=entrypoint_environment(tiny_model), capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(elsewhere)
    assert (elsewhere / "config.json").is_file()
    assert not tiny_model.parent.exists()
