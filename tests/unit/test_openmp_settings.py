"""The executor's OpenMP wait-policy default: passive unless the user chose, and only before torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from executor_service.openmp_settings import apply_openmp_defaults


@pytest.mark.parametrize(
    ("environ", "want", "changed"),
    [
        ({}, {"OMP_WAIT_POLICY": "PASSIVE"}, True),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}, False),
        ({"GOMP_SPINCOUNT": "1000"}, {"GOMP_SPINCOUNT": "1000"}, False),
    ],
)
def test_passive_unless_the_user_chose(environ, want, changed, monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert apply_openmp_defaults(environ) is changed
    assert environ == want


def test_too_late_once_torch_is_loaded():
    import torch  # noqa: F401 - loaded, as in a process that called the CLI in-process

    environ: dict[str, str] = {}
    assert apply_openmp_defaults(environ) is False
    assert environ == {}


def test_the_executor_command_reaches_torch_with_the_default():
    """`pagewire executor` sets it before torch loads: the child's torch sees it in its environment."""
    code = (
        "import os, sys\n"
        "from pagewire import cli\n"
        "def serve(config):\n"
        "    import torch\n"
        "    print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
        "    raise SystemExit(0)\n"
        "import executor_service.server\n"
        "executor_service.server.serve = serve\n"
        "cli.asyncio.run = lambda coroutine: coroutine\n"
        "cli.main(['executor', '--simulate', 'smollm2-135m'])\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["PASSIVE", "True"], out.stderr[-2000:]
