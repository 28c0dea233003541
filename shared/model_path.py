"""Where a `--model` path's GGUF file is, for both services: a `.gguf` file or a directory holding one."""

from __future__ import annotations

from pathlib import Path

GGUF_SUFFIX = ".gguf"
HF_CONFIG_FILE = "config.json"


def find_gguf_file(path: str | Path) -> Path | None:
    """The resolved GGUF file `path` names, or None when `path` is a Hugging Face checkpoint directory.

    `path` may be a `.gguf` file, or a directory without `config.json` holding exactly one `.gguf`
    file. A directory with `config.json` is a Hugging Face checkpoint (None), and so is a directory
    with neither (None: the Hugging Face loader then says what is missing). Raises ValueError for a
    missing path, a file that is not `.gguf`, or a directory holding several `.gguf` files.
    """
    candidate = Path(path)
    if candidate.is_file():
        if candidate.suffix.lower() != GGUF_SUFFIX:
            raise ValueError(
                f"{candidate} is a file but not a {GGUF_SUFFIX} file: pass a GGUF file or a Hugging Face "
                "checkpoint directory"
            )
        return candidate.resolve()
    if not candidate.is_dir():
        raise ValueError(f"model path {candidate} does not exist: pass a GGUF file or a checkpoint directory")
    if (candidate / HF_CONFIG_FILE).is_file():
        return None
    files = sorted(
        child for child in candidate.iterdir() if child.suffix.lower() == GGUF_SUFFIX and child.is_file()
    )
    if len(files) > 1:
        names = ", ".join(file.name for file in files)
        raise ValueError(
            f"{candidate} holds several GGUF files ({names}): pass the one to serve as --model FILE"
        )
    return files[0].resolve() if files else None
