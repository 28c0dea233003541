"""What `--model` means: a path, `tiny` (a small random model made on first use), or none (SmolLM2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import structlog

from pagewire.default_model import default_model

TINY = "tiny"
MODEL_HELP = (
    "checkpoint: a Hugging Face directory, a .gguf file or a directory holding one; `tiny` for a small "
    "random model (created on first use in $PAGEWIRE_CACHE, default ~/.cache/pagewire) "
    "(default: SmolLM2-135M-Instruct, installed by `make install`)"
)

log = structlog.get_logger(__name__)


def tiny_model_dir() -> Path:
    cache = Path(os.environ.get("PAGEWIRE_CACHE", Path.home() / ".cache" / "pagewire"))
    return cache / "tiny-llama"


def _ensure_tiny_model(path: Path) -> Path:
    # In a child process, so a launcher that serves the scheduler itself never imports torch.
    if not (path / "config.json").is_file():
        log.info("creating_tiny_model", path=str(path))
        subprocess.run([sys.executable, "-m", "pagewire", "create-tiny-model", str(path)], check=True,
                       stdout=subprocess.DEVNULL)
    return path


def resolve_model(model: str | None) -> Path:
    """The checkpoint path `--model` names; ValueError (with the install command) when the default
    model is asked for and not installed."""
    if model is None:
        return default_model()
    if model == TINY:
        return _ensure_tiny_model(tiny_model_dir())
    return Path(model)
