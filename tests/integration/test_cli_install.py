"""`pip install .` (not editable) from a clean copy of the sources gives a working `pagewire` command
with the protobuf modules generated at build time (they are not in the sources)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "protos", "pagewire", "shared",
           "scheduler_service", "executor_service", "benchmarks")


def test_pip_install_builds_the_protos_and_the_command_runs(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "pb"))
        else:
            shutil.copy2(path, source / name)
    assert not (source / "shared" / "pb").exists()
    target = tmp_path / "target"
    # No build isolation: the build uses this environment's setuptools and grpcio-tools (offline).
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
         str(target), str(source)], check=True, capture_output=True, text=True, timeout=300,
    )
    generated = sorted(p.name for p in (target / "shared" / "pb" / "pagewire" / "v1").glob("*.py"))
    assert generated == ["__init__.py", "executor_pb2.py", "executor_pb2_grpc.py", "generate_pb2.py",
                         "generate_pb2_grpc.py"]
    # `python -S`: no site-packages .pth files, so the editable install of this checkout is invisible;
    # the dependencies come from this environment's site-packages, after the installed copy.
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin"}
    check = (
        "import pagewire, shared.pb.pagewire.v1.generate_pb2 as pb, sys; from pagewire.cli import main; "
        "print(pagewire.__file__); print(pb.__file__); sys.argv[0] = 'pagewire'; main(['--help'])"
    )
    done = subprocess.run([sys.executable, "-S", "-c", check], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(target / "pagewire" / "__init__.py")
    assert lines[1] == str(target / "shared" / "pb" / "pagewire" / "v1" / "generate_pb2.py")
    assert "usage: pagewire" in done.stdout and "chat" in done.stdout
    script = (target / "bin" / "pagewire").read_text()
    assert "from pagewire.cli import main" in script
