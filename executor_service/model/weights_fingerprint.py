"""A cheap identity of the weights an executor loaded, so a scheduler notices other weights behind the
same path (files replaced in place) instead of mixing two models in one answer."""

from __future__ import annotations

import hashlib
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin")
CHUNK_BYTES = 64 * 1024
MAX_CHUNKS_PER_FILE = 64


def weights_fingerprint(path: str | Path) -> str:
    """SHA-256 over, for each weight file (the file itself, or a directory's *.safetensors / *.gguf /
    *.bin and config.json, sorted): its name, size, first 1 MiB (every header: safetensors JSON, GGUF
    metadata) and up to 64 chunks of 64 KiB spread evenly through it (values, so weights with the same
    shapes but other values differ). Reads at most ~5 MiB per file; not a cryptographic seal."""
    root = Path(path)
    files = [root] if root.is_file() else sorted(
        p for p in root.iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")
    )
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as f:
            digest.update(f.read(1024 * 1024))
            if size > CHUNK_BYTES:
                for i in range(MAX_CHUNKS_PER_FILE):
                    f.seek((size - CHUNK_BYTES) * i // max(MAX_CHUNKS_PER_FILE - 1, 1))
                    digest.update(f.read(CHUNK_BYTES))
    return digest.hexdigest()[:32]
