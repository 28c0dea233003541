"""docker-compose.yml and the CPU override: each image built once, ports, the executor token, health,
models, scaling; commands parsed by the real CLI, and by `docker compose config` where it is installed."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess

import pytest

from pagewire.cli import build_parser
from scheduler_service.executor_discovery import ExecutorTarget
from shared.bearer_auth import EXECUTOR_TOKEN_ENV
from tests.helpers.compose_files import (
    BASE_FILE,
    CPU_FILE,
    REPO_ROOT,
    ComposeTag,
    interpolate,
    load_compose,
    merge,
    option,
    seconds,
)

DEFAULT_MODEL = "/opt/pagewire/smollm2"
TOKEN_FILE = "/run/pagewire/executor-token"
CPU_ARGS = {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu", "EXECUTOR_EXTRAS": "executor"}


def subcommands() -> set[str]:
    actions = [action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction)]
    return set(actions[0].choices)


@pytest.fixture(scope="module")
def base() -> dict:
    return interpolate(load_compose(BASE_FILE), {})


@pytest.fixture(scope="module")
def cpu() -> dict:
    return interpolate(merge(load_compose(BASE_FILE), load_compose(CPU_FILE)), {})


def builds_each_image_once(services: dict) -> None:
    """Every image is built by exactly one service, and a service without `build` runs one of them."""
    built = [service["image"] for service in services.values() if "build" in service]
    assert len(built) == len(set(built)), f"an image is built twice: {built}"
    for name, service in services.items():
        if "build" not in service:
            assert service["image"] in built and service["pull_policy"] == "never", name


def test_two_targets_of_one_dockerfile_each_built_once(base: dict, cpu: dict) -> None:
    services = base["services"]
    assert set(services) == {"executor-token", "executor", "scheduler"}
    build = {"context": ".", "dockerfile": "Dockerfile"}
    assert services["executor"]["build"] == {**build, "target": "executor"}
    assert services["scheduler"]["build"] == {**build, "target": "scheduler"}
    assert (services["executor"]["image"], services["scheduler"]["image"]) == (
        "pagewire-executor:gpu", "pagewire-scheduler")
    assert services["executor-token"]["image"] == "pagewire-scheduler"
    assert services["executor"]["init"] is services["scheduler"]["init"] is True
    builds_each_image_once(services)
    builds_each_image_once(cpu["services"])


def test_executor_reserves_one_nvidia_gpu_and_runs_on_cuda(base: dict) -> None:
    executor = base["services"]["executor"]
    devices = executor["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert option(executor["command"], "--device") == "cuda"
    assert "deploy" not in base["services"]["scheduler"]
    assert "deploy" not in base["services"]["executor-token"]


def test_ports_and_addresses_line_up(base: dict) -> None:
    executor, scheduler = base["services"]["executor"], base["services"]["scheduler"]
    assert option(executor["command"], "--port") == "50061"
    assert option(scheduler["command"], "--port") == "50051"
    assert option(scheduler["command"], "--http-port") == "8000"
    assert option(executor["command"], "--host") == option(scheduler["command"], "--host") == "0.0.0.0"
    assert option(scheduler["command"], "--executor") == "executor:50061"
    assert executor["expose"] == ["50061"]
    assert "ports" not in executor and "ports" not in base["services"]["executor-token"]
    assert scheduler["ports"] == ["50051:50051", "8000:8000"]
    moved = interpolate(load_compose(BASE_FILE), {"GRPC_PORT": "15051", "HTTP_PORT": "18000"})
    assert moved["services"]["scheduler"]["ports"] == ["15051:50051", "18000:8000"]


def test_start_order_token_then_healthy_executor_then_scheduler(base: dict) -> None:
    services = base["services"]
    assert services["executor"]["depends_on"] == {
        "executor-token": {"condition": "service_completed_successfully"}}
    assert services["scheduler"]["depends_on"] == {"executor": {"condition": "service_healthy"}}
    assert services["executor-token"]["restart"] == "no"


def test_both_services_read_the_generated_token_and_an_environment_token_wins(base: dict) -> None:
    """The writer's file reaches both services read-only; PAGEWIRE_EXECUTOR_TOKEN (empty by default) is
    passed through so a token set by hand replaces it; no token is ever on a command line."""
    services = base["services"]
    writer = services["executor-token"]
    assert writer["entrypoint"][:2] == ["python", "-c"] and writer["entrypoint"][3:] == [TOKEN_FILE]
    assert writer["volumes"] == ["executor-token:/run/pagewire"]
    for name in ("executor", "scheduler"):
        service = services[name]
        assert service["environment"] == {EXECUTOR_TOKEN_ENV: "", "PAGEWIRE_EXECUTOR_TOKEN_FILE": TOKEN_FILE}
        assert "executor-token:/run/pagewire:ro" in service["volumes"]
        assert "--executor-token" not in service["command"]
    by_hand = interpolate(load_compose(BASE_FILE), {EXECUTOR_TOKEN_ENV: "s3cret"})["services"]
    assert by_hand["executor"]["environment"][EXECUTOR_TOKEN_ENV] == "s3cret"
    assert by_hand["scheduler"]["environment"][EXECUTOR_TOKEN_ENV] == "s3cret"
    assert "executor-token" in base["volumes"]


@pytest.mark.parametrize(
    ("name", "probe_args", "min_start_period_s"),
    [
        ("executor", ["127.0.0.1:50061", ""], 300.0),
        ("scheduler", ["127.0.0.1:50051", "pagewire.v1.Generation", "http://127.0.0.1:8000/health"], 30.0),
    ],
)
def test_healthcheck_probes_the_service_with_sane_timing(
    base: dict, name: str, probe_args: list[str], min_start_period_s: float
) -> None:
    healthcheck = base["services"][name]["healthcheck"]
    test = healthcheck["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert test[4:] == probe_args
    assert "grpc_health.v1" in test[3] and "urllib.request" in test[3]
    interval_s, timeout_s = seconds(healthcheck["interval"]), seconds(healthcheck["timeout"])
    start_period_s = seconds(healthcheck["start_period"])
    start_interval_s = seconds(healthcheck["start_interval"])
    assert 1.0 <= interval_s <= 60.0
    assert 1.0 <= timeout_s <= interval_s
    assert 0.5 <= start_interval_s <= interval_s
    assert min_start_period_s <= start_period_s <= 1800.0
    assert 1 <= healthcheck["retries"] <= 10


def test_models_volume_is_shared_and_read_only_for_the_scheduler(base: dict) -> None:
    assert base["services"]["executor"]["volumes"] == [
        "models:/models", "kernel-cache:/var/cache/pagewire", "executor-token:/run/pagewire:ro"]
    assert base["services"]["scheduler"]["volumes"] == [
        "models:/models:ro", "executor-token:/run/pagewire:ro"]
    assert set(base["volumes"]) == {"models", "kernel-cache", "executor-token"}


def test_model_and_models_dir_come_from_the_environment() -> None:
    environment = {"MODEL": "/models/Llama-3.2-1B", "MODELS_DIR": "/srv/checkpoints"}
    services = interpolate(load_compose(BASE_FILE), environment)["services"]
    assert option(services["executor"]["command"], "--model") == "/models/Llama-3.2-1B"
    assert services["executor"]["volumes"][0] == "/srv/checkpoints:/models"
    assert services["scheduler"]["volumes"][0] == "/srv/checkpoints:/models:ro"


def test_executor_command_parses_with_the_real_cli_and_serves_the_baked_model(base: dict) -> None:
    args = build_parser().parse_args(base["services"]["executor"]["command"])
    assert (args.command, args.model, args.host, args.port, args.device) == (
        "executor", DEFAULT_MODEL, "0.0.0.0", 50061, "cuda"
    )


def test_scheduler_command_parses_with_the_real_cli(base: dict) -> None:
    assert "scheduler" in subcommands()
    args = build_parser().parse_args(base["services"]["scheduler"]["command"])
    assert (args.command, args.host, args.port, args.http_port) == ("scheduler", "0.0.0.0", 50051, 8000)
    assert args.tokenizer_dir is None, "the tokenizer must follow the executor's model (MODEL)"


def test_cpu_override_drops_the_gpu_and_builds_the_cpu_executor_only(base: dict, cpu: dict) -> None:
    override = load_compose(CPU_FILE)["services"]["executor"]
    assert override["deploy"] == ComposeTag("!reset", "null")
    executor, scheduler = cpu["services"]["executor"], cpu["services"]["scheduler"]
    assert "deploy" not in executor
    assert build_parser().parse_args(executor["command"]).device == "cpu"
    base_command = base["services"]["executor"]["command"]
    assert executor["command"] == [*base_command[:-1], "cpu"]
    assert executor["build"] == {
        "context": ".", "dockerfile": "Dockerfile", "target": "executor", "args": CPU_ARGS}
    assert executor["image"] == "pagewire-executor:cpu"
    # The scheduler image has no torch: the GPU and the CPU stacks share it.
    assert (scheduler["build"], scheduler["image"]) == (
        base["services"]["scheduler"]["build"], base["services"]["scheduler"]["image"])
    base_scheduler = base["services"]["scheduler"]["command"]
    at = base_scheduler.index("--executor") + 1
    assert scheduler["command"] == [*base_scheduler[:at], "dns:///executor:50061", *base_scheduler[at + 1:]]
    assert executor["healthcheck"] == base["services"]["executor"]["healthcheck"]
    assert executor["environment"] == base["services"]["executor"]["environment"]
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


def test_docker_compose_config_accepts_the_base_and_the_cpu_override() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed")
    removed = ("MODEL", "MODELS_DIR", "GRPC_PORT", "HTTP_PORT", EXECUTOR_TOKEN_ENV)
    environment = {name: value for name, value in os.environ.items() if name not in removed}
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
    assert rendered[2]["executor"]["build"]["target"] == "executor"
    assert rendered[2]["executor"]["build"]["args"] == CPU_ARGS
    assert rendered[2]["scheduler"]["build"]["target"] == "scheduler"
    assert option(rendered[2]["scheduler"]["command"], "--executor") == "dns:///executor:50061"
    assert rendered[2]["scheduler"]["depends_on"]["executor"]["condition"] == "service_healthy"
    assert rendered[2]["executor"]["depends_on"]["executor-token"]["condition"] == (
        "service_completed_successfully")
    assert [(p["target"], p["published"]) for p in rendered[2]["scheduler"]["ports"]] == [
        (50051, "50051"), (8000, "8000")]
