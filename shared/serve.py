"""`pagewire serve`: an executor process and the scheduler, started together on this machine."""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from shared.child_process import stop_child

if TYPE_CHECKING:
    from scheduler_service.engine_config import EngineConfig

log = structlog.get_logger(__name__)


def default_model_dir() -> Path:
    """The tiny default model, created on first use in the cache directory."""
    cache = Path(os.environ.get("PAGEWIRE_CACHE", Path.home() / ".cache" / "pagewire"))
    return cache / "tiny-llama"


def _ensure_tiny_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        log.info("creating_tiny_model", path=str(path))
        subprocess.run([sys.executable, "-m", "shared.cli", "create-tiny-model", str(path)], check=True)
    return path


def serve_both(args: argparse.Namespace, engine_config: EngineConfig) -> int:
    """Starts the executor as a child process, serves the scheduler here, stops both on SIGTERM/SIGINT."""
    from scheduler_service.server import serve

    model = Path(args.model) if args.model else _ensure_tiny_model(default_model_dir())
    command = [
        sys.executable, "-m", "shared.cli", "executor", "--model", str(model), "--device", args.device,
        "--port", str(args.executor_port), *shlex.split(args.executor_args),
    ]
    executor = subprocess.Popen(command)
    log.info("executor_started", pid=executor.pid, model=str(model))
    try:
        asyncio.run(serve(engine_config))
    finally:
        stop_child(executor)
    return 0
