"""Prints the requirements of pyproject.toml's base install plus the extras named in argv[1] (comma
separated, self references such as `pagewire[executor]` expanded), one a line: the Dockerfile installs
them before the sources, so editing code does not reinstall them."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

SELF_REFERENCE = re.compile(r"^pagewire\[(?P<extras>[^\]]+)\]$")


def requirements(project: dict, extras: list[str]) -> list[str]:
    """The base dependencies, then each extra's, in order, each line once."""
    lines = list(project["dependencies"])
    pending = list(extras)
    seen: set[str] = set()
    while pending:
        extra = pending.pop(0)
        if extra in seen:
            continue
        seen.add(extra)
        if extra not in project["optional-dependencies"]:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        for line in project["optional-dependencies"][extra]:
            reference = SELF_REFERENCE.match(line)
            if reference:
                pending.extend(name.strip() for name in reference.group("extras").split(","))
            elif line not in lines:
                lines.append(line)
    return lines


def main(argv: list[str]) -> int:
    extras = [name for name in (argv[1] if len(argv) > 1 else "").split(",") if name]
    project = tomllib.loads(Path("pyproject.toml").read_text())["project"]
    print(*requirements(project, extras), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
