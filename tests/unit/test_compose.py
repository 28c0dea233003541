"""The container setup: compose files, the CPU override, the Dockerfile's build args, entrypoint and probe."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from executor_service.tiny_model import create_tiny_model
from shared.child_process import stop_child
from pagewire.cli import build_parser
from scheduler_service.executor_discovery import ExecutorTarget
from tests.helpers.processes import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_FILE = REPO_ROOT / "docker-compose.yml"
CPU_FILE = REPO_ROOT / "docker-compose.cpu.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
ENTRYPOINT_HEREDOC = re.compile(
    r"^COPY --chmod=0755 <<'EOF' /usr/local/bin/pagewire-entrypoint\n(?P<script>.*?)^EOF$", re.S | re.M
)
# Sequences that a later compose file replaces instead of appending to (the compose merge rules).
REPLACED_SEQUENCES = frozenset({"command", "entrypoint", "test"})


@dataclass(frozen=True, slots=True)
class ComposeTag:
    """A value tagged `!reset` or `!override` in a compose file, kept for the merge to act on."""

    tag: str
    value: object


class _ComposeLoader(yaml.SafeLoader):
    pass


def _construct_tagged(loader: yaml.SafeLoader, node: yaml.Node) -> ComposeTag:
    if isinstance(node, yaml.MappingNode):
        return ComposeTag(node.tag, loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return ComposeTag(node.tag, loader.construct_sequence(node, deep=True))
    return ComposeTag(node.tag, loader.construct_scalar(node))


_ComposeLoader.add_constructor("!reset", _construct_tagged)
_ComposeLoader.add_constructor("!override", _construct_tagged)


def load_compose(path: Path) -> dict:
    with path.open() as stream:
        return yaml.load(stream, Loader=_ComposeLoader)


def merge(base: object, override: object, key: str = "") -> object:
    """Compose's merge of `override` onto `base`, for the kinds of values these files hold."""
    if isinstance(override, ComposeTag):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for name, value in override.items():
            if isinstance(value, ComposeTag) and value.tag == "!reset":
                merged.pop(name, None)
            else:
                merged[name] = merge(base.get(name), value, name)
        return merged
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + override
    return override


def interpolate(value: object, environment: Mapping[str, str]) -> object:
    """Substitutes `${NAME}` and `${NAME:-default}` the way compose does before it reads the model."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(3)
        if environment.get(name):
            return environment[name]
        assert default is not None, f"${{{name}}} has no default, so compose would need it set"
        return default

    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(:-([^}]*))?\}", substitute, value)
    if isinstance(value, dict):
        return {name: interpolate(item, environment) for name, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environment) for item in value]
    return value


def seconds(duration: str) -> float:
    """A compose duration such as '2s', '10m' or '1m30s' in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def subcommands() -> set[str]:
    actions = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return set(actions[0].choices)


@pytest.fixture(scope="module")
def base() -> dict:
    return interpolate(load_compose(BASE_FILE), {})


@pytest.fixture(scope="module")
def cpu() -> dict:
    return interpolate(merge(load_compose(BASE_FILE), load_compose(CPU_FILE)), {})


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text()


def test_both_services_build_the_one_dockerfile(base: dict) -> None:
    services = base["services"]
    assert set(services) == {"executor", "scheduler"}
    for service in services.values():
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
        assert service["image"] == "pagewire:gpu"
        assert service["init"] is True
    assert (REPO_ROOT / "Dockerfile").is_file()


def test_executor_reserves_one_nvidia_gpu_and_runs_on_cuda(base: dict) -> None:
    executor = base["services"]["executor"]
    devices = executor["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert option(executor["command"], "--device") == "cuda"
    assert "deploy" not in base["services"]["scheduler"]


def test_ports_and_addresses_line_up(base: dict) -> None:
    executor, scheduler = base["services"]["executor"], base["services"]["scheduler"]
    assert option(executor["command"], "--port") == "50061"
    assert option(scheduler["command"], "--port") == "50051"
    assert option(executor["command"], "--host") == option(scheduler["command"], "--host") == "0.0.0.0"
    assert option(scheduler["command"], "--executor") == "executor:50061"
    assert executor["expose"] == ["50061"]
    assert "ports" not in executor
    assert scheduler["ports"] == ["50051:50051"]


def test_scheduler_starts_once_the_executor_is_healthy(base: dict) -> None:
    assert base["services"]["scheduler"]["depends_on"] == {"executor": {"condition": "service_healthy"}}


@pytest.mark.parametrize(
    ("name", "address", "service", "min_start_period_s"),
    [
        ("executor", "127.0.0.1:50061", "", 300.0),
        ("scheduler", "127.0.0.1:50051", "pagewire.v1.Generation", 30.0),
    ],
)
def test_healthcheck_probes_the_service_with_sane_timing(
    base: dict, name: str, address: str, service: str, min_start_period_s: float
) -> None:
    healthcheck = base["services"][name]["healthcheck"]
    test = healthcheck["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert test[4:] == [address, service]
    assert "grpc_health.v1" in test[3]
    interval_s, timeout_s = seconds(healthcheck["interval"]), seconds(healthcheck["timeout"])
    start_period_s = seconds(healthcheck["start_period"])
    start_interval_s = seconds(healthcheck["start_interval"])
    assert 1.0 <= interval_s <= 60.0
    assert 1.0 <= timeout_s <= interval_s
    assert 0.5 <= start_interval_s <= interval_s
    assert min_start_period_s <= start_period_s <= 1800.0
    assert 1 <= healthcheck["retries"] <= 10


def test_models_volume_is_shared_and_read_only_for_the_scheduler(base: dict) -> None:
    assert base["services"]["executor"]["volumes"] == ["models:/models", "kernel-cache:/var/cache/pagewire"]
    assert base["services"]["scheduler"]["volumes"] == ["models:/models:ro"]
    assert set(base["volumes"]) == {"models", "kernel-cache"}


def test_model_and_models_dir_come_from_the_environment() -> None:
    environment = {"MODEL": "/models/Llama-3.2-1B", "MODELS_DIR": "/srv/checkpoints"}
    services = interpolate(load_compose(BASE_FILE), environment)["services"]
    assert option(services["executor"]["command"], "--model") == "/models/Llama-3.2-1B"
    assert services["executor"]["volumes"][0] == "/srv/checkpoints:/models"
    assert services["scheduler"]["volumes"] == ["/srv/checkpoints:/models:ro"]


def test_executor_command_parses_with_the_real_cli(base: dict) -> None:
    args = build_parser().parse_args(base["services"]["executor"]["command"])
    assert (args.command, args.model, args.host, args.port, args.device) == (
        "executor", "/models/tiny", "0.0.0.0", 50061, "cuda"
    )


def test_scheduler_command_parses_with_the_real_cli(base: dict) -> None:
    if "scheduler" not in subcommands():
        pytest.skip("`pagewire scheduler` is not in pagewire.cli.build_parser() yet")
    args = build_parser().parse_args(base["services"]["scheduler"]["command"])
    assert (args.command, args.host, args.port) == ("scheduler", "0.0.0.0", 50051)


def test_cpu_override_drops_the_gpu_and_runs_on_the_cpu(base: dict, cpu: dict) -> None:
    override = load_compose(CPU_FILE)["services"]["executor"]
    assert override["deploy"] == ComposeTag("!reset", "null")
    executor, scheduler = cpu["services"]["executor"], cpu["services"]["scheduler"]
    assert "deploy" not in executor
    args = build_parser().parse_args(executor["command"])
    assert args.device == "cpu"
    base_command = base["services"]["executor"]["command"]
    assert executor["command"] == [*base_command[:-1], "cpu"]
    cpu_args = {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu", "CUPY_PACKAGE": ""}
    for service in (executor, scheduler):
        assert service["build"] == {"context": ".", "dockerfile": "Dockerfile", "args": cpu_args}
        assert service["image"] == "pagewire:cpu"
    base_scheduler = base["services"]["scheduler"]["command"]
    at = base_scheduler.index("--executor") + 1
    assert scheduler["command"] == [*base_scheduler[:at], "dns:///executor:50061", *base_scheduler[at + 1:]]
    assert executor["healthcheck"] == base["services"]["executor"]["healthcheck"]
    assert scheduler["depends_on"] == {"executor": {"condition": "service_healthy"}}


def test_cpu_override_scales_executors_with_compose_through_dns(cpu: dict) -> None:
    """`up --scale executor=3`: replicas must not collide (no fixed name, host port or hostname), and the
    scheduler must drive every address the service name resolves to, on the port the executors serve."""
    executor, scheduler = cpu["services"]["executor"], cpu["services"]["scheduler"]
    for collides in ("container_name", "ports", "hostname"):
        assert collides not in executor, f"{collides} would make `--scale executor=N` fail"
    scheduler_args = build_parser().parse_args(scheduler["command"])
    target = ExecutorTarget.parse(scheduler_args.executor_addresses[0])
    assert len(scheduler_args.executor_addresses) == 1
    executor_port = int(option(executor["command"], "--port"))
    assert (target.is_dns, target.host, target.port) == (True, "executor", executor_port)
    assert executor["expose"] == [str(target.port)]
    # The replicas share the models volume, as the scheduler reads the tokenizer from it.
    assert executor["volumes"][0].split(":")[0] == scheduler["volumes"][0].split(":")[0]


def test_gpu_compose_keeps_one_executor_per_gpu_and_documents_device_ids(base: dict) -> None:
    """compose cannot give replicas of one service distinct GPUs: the GPU file keeps one reserved device
    per executor service and says how to add one service per GPU."""
    text = BASE_FILE.read_text()
    assert 'device_ids: ["1"]' in text
    assert "--scale executor=N` would put every replica on the same GPU" in text
    for service in base["services"].values():
        reservations = service.get("deploy", {}).get("resources", {}).get("reservations", {})
        for device in reservations.get("devices", []):
            assert device.get("count") == 1 or len(device.get("device_ids", [])) == 1


def test_build_args_exist_in_the_dockerfile_and_torch_matches_the_makefile(
    cpu: dict, dockerfile_text: str
) -> None:
    declared = dict(re.findall(r"^ARG (\w+)(?:=(.*))?$", dockerfile_text, re.M))
    for service in cpu["services"].values():
        assert set(service["build"]["args"]) <= set(declared), "docker ignores a build arg no ARG declares"
    makefile_pin = re.search(r"^TORCH_PIN \?= torch==(\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M)
    assert makefile_pin is not None
    assert declared["TORCH_VERSION"] == makefile_pin.group(1)
    assert declared["TORCH_INDEX_URL"] == "https://pypi.org/simple"


def test_dockerfile_runs_as_a_user_and_defaults_to_the_tiny_model(dockerfile_text: str) -> None:
    users = re.findall(r"^USER (\S+)$", dockerfile_text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.findall(r"^FROM \$\{PYTHON_IMAGE\} AS (\w+)$", dockerfile_text, re.M) == ["build", "runtime"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile_text
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile_text, re.M).group(1))
    args = build_parser().parse_args(cmd)
    assert (args.command, args.model, args.port) == ("executor", "/models/tiny", 50061)
    assert re.search(r"^ENTRYPOINT \[\"pagewire-entrypoint\"\]$", dockerfile_text, re.M)
    assert ENTRYPOINT_HEREDOC.search(dockerfile_text)


def test_docker_compose_config_accepts_the_base_and_the_cpu_override() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    environment = {name: value for name, value in os.environ.items() if name not in ("MODEL", "MODELS_DIR")}
    rendered = {}
    for files in (["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]):
        flags = [flag for name in files for flag in ("-f", name)]
        run = subprocess.run(
            [docker, "compose", *flags, "config", "--format", "json"],
            cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60,
        )
        assert run.returncode == 0, run.stderr
        rendered[len(files)] = json.loads(run.stdout)["services"]
    gpu_devices = rendered[1]["executor"]["deploy"]["resources"]["reservations"]["devices"]
    assert [(device["driver"], device["count"], device["capabilities"]) for device in gpu_devices] == [
        ("nvidia", 1, ["gpu"])
    ]
    assert "deploy" not in rendered[2]["executor"]
    assert rendered[2]["executor"]["command"][-2:] == ["--device", "cpu"]
    assert option(rendered[2]["scheduler"]["command"], "--executor") == "dns:///executor:50061"
    assert rendered[2]["scheduler"]["depends_on"]["executor"]["condition"] == "service_healthy"


@pytest.fixture(scope="module")
def entrypoint_script(tmp_path_factory: pytest.TempPathFactory, dockerfile_text: str) -> Path:
    match = ENTRYPOINT_HEREDOC.search(dockerfile_text)
    assert match is not None
    path = tmp_path_factory.mktemp("entrypoint") / "pagewire-entrypoint"
    path.write_text(match.group("script"))
    return path


def entrypoint_environment(tiny_model: Path) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "pagewire").is_file():
        pytest.skip(f"the pagewire console script is not installed in {bin_dir}")
    path = os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
    return dict(os.environ, PATH=path, PAGEWIRE_TINY_MODEL=str(tiny_model), PYTHONUNBUFFERED="1")


def probe(base: dict, service_name: str, address: str, service: str) -> subprocess.CompletedProcess[str]:
    """Runs the compose healthcheck's probe script against `address` for `service`."""
    script = base["services"][service_name]["healthcheck"]["test"][3]
    return subprocess.run(
        [sys.executable, "-c", script, address, service], capture_output=True, text=True, timeout=30
    )


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


def test_entrypoint_creates_the_tiny_model_and_the_probes_track_health(
    entrypoint_script: Path, base: dict, tmp_path: Path
) -> None:
    tiny_model = tmp_path / "models" / "tiny"
    environment = entrypoint_environment(tiny_model)
    executor_address = f"127.0.0.1:{free_port()}"
    scheduler_address = f"127.0.0.1:{free_port()}"
    executor = [
        "sh", str(entrypoint_script), "executor", f"--model={tiny_model}/", "--host", "127.0.0.1",
        "--port", executor_address.rsplit(":", 1)[1], "--device", "cpu",
        "--num-gpu-blocks-override", "64", "--swap-space", "0.01",
    ]
    scheduler = [
        "sh", str(entrypoint_script), "scheduler", "--executor", executor_address, "--host", "127.0.0.1",
        "--port", scheduler_address.rsplit(":", 1)[1], "--max-model-len", "512",
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
        with serving(
            scheduler,
            environment,
            tmp_path / "scheduler.log",
            lambda: probe(base, "scheduler", scheduler_address, "pagewire.v1.Generation").returncode == 0,
        ):
            assert probe(base, "scheduler", scheduler_address, "").returncode == 0
    closed = probe(base, "scheduler", scheduler_address, "pagewire.v1.Generation")
    assert (closed.returncode, closed.stderr.strip()) == (
        1, f"{scheduler_address} 'pagewire.v1.Generation': UNAVAILABLE"
    )


def test_entrypoint_passes_other_commands_through_untouched(entrypoint_script: Path, tmp_path: Path) -> None:
    tiny_model = tmp_path / "models" / "tiny"
    elsewhere = tmp_path / "elsewhere"
    run = subprocess.run(
        ["sh", str(entrypoint_script), "create-tiny-model", str(elsewhere)],
        env=entrypoint_environment(tiny_model), capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(elsewhere)
    assert (elsewhere / "config.json").is_file()
    assert not tiny_model.parent.exists()
