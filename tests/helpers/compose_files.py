"""The container files as compose reads them: YAML with compose's tags, its merge of an override file onto
a base file and its `${NAME:-default}` interpolation, for the tests of docker-compose*.yml."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
BASE_FILE = REPO_ROOT / "docker-compose.yml"
CPU_FILE = REPO_ROOT / "docker-compose.cpu.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
ENTRYPOINT = REPO_ROOT / "docker" / "pagewire-entrypoint"
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


def dockerfile_stages(text: str) -> dict[str, list[str]]:
    """Each `FROM ... AS NAME` stage's instruction lines (continuations joined), by stage name."""
    stages: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in re.sub(r"\s*\\\n\s*", " ", text).splitlines():
        stage = re.match(r"^FROM \S+ AS (\S+)$", line)
        if stage:
            current = stages.setdefault(stage.group(1), [])
        elif current is not None and line and not line.startswith("#"):
            current.append(line)
    return stages
