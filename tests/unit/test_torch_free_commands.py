"""The base install (no torch: the slim scheduler image) runs the scheduler's commands, and the commands
that need torch say what to install instead of a traceback. Each case runs in a child whose imports of
torch fail, as where it is not installed."""

from __future__ import annotations

import subprocess
import sys

# `import torch` then raises ImportError and importlib.util.find_spec("torch") says None.
BLOCK_TORCH = "import sys\nsys.modules['torch'] = None\n"


def run_without_torch(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCK_TORCH + code], capture_output=True, text=True,
                          timeout=120)


def test_the_cli_and_the_scheduler_service_import_and_parse_without_torch() -> None:
    done = run_without_torch(
        "import scheduler_service.server, scheduler_service.engine, scheduler_service.http.openai_app\n"
        "from pagewire.cli import build_parser\n"
        "args = build_parser().parse_args(\n"
        "    ['scheduler', '--executor', 'executor:50061', '--http-port', '8000'])\n"
        "print(args.command, args.executor_addresses, args.http_port)\n"
        "print(sorted(name for name, module in sys.modules.items()\n"
        "             if module is not None and name.split('.')[0] in ('torch', 'safetensors', 'cupy')))\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["scheduler ['executor:50061'] 8000", "[]"]


def test_scheduler_help_runs_without_torch() -> None:
    done = run_without_torch(
        "from pagewire.cli import main\nsys.argv[0] = 'pagewire'\nmain(['scheduler', '--help'])\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: pagewire scheduler")


def test_the_executor_without_torch_says_what_to_install() -> None:
    for command in (["executor", "--model", "/nonexistent"], ["create-tiny-model", "/tmp/never-written"],
                    ["create-draft-model", "tiny", "/tmp/never-written", "--num-layers", "1"]):
        done = run_without_torch(f"from pagewire.cli import main\nsys.exit(main({command!r}))\n")
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.strip() == (
            f"pagewire {command[0]}: error: `pagewire {command[0]}` needs torch, which the base install "
            "leaves out: pip install 'pagewire[executor]' (or [cuda13] / [cuda12] for the CUDA ops)"
        )
