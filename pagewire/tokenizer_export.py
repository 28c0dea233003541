"""A GGUF file's tokenizer alone: a GGUF file with the same `tokenizer.*` and `general.*` metadata and no
tensors, so a scheduler can tokenize for a GGUF model without holding its weights.

`python -m pagewire.tokenizer_export MODEL.gguf TOKENIZER.gguf` is how the slim scheduler image carries the
default model's tokenizer: TOKENIZER.gguf is written at the path where the executor image holds the
model, so the path the executor's Describe reports names the same tokenizer in the scheduler's image.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gguf import GGUFReader, GGUFValueType, GGUFWriter

ARCHITECTURE_KEY = "general.architecture"
KEPT_PREFIXES = ("tokenizer.", "general.")


def export_gguf_tokenizer(gguf_file: Path, output_file: Path) -> int:
    """Writes `output_file`: every `tokenizer.*` and `general.*` key of `gguf_file` with its value and
    value type, no tensors. Returns the number of keys copied (the architecture included).

    `Tokenizer.from_gguf_file(output_file)` then encodes, decodes and renders chats exactly as
    `Tokenizer.from_gguf_file(gguf_file)`. ValueError when `gguf_file` is not a GGUF file or has no
    tokenizer; `output_file` is then not written.
    """
    try:
        reader = GGUFReader(gguf_file)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {gguf_file} as a GGUF file: {error}") from error
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise ValueError(f"{gguf_file} has no tokenizer.ggml.tokens: there is no tokenizer to export")
    architecture = reader.fields.get(ARCHITECTURE_KEY)
    writer = GGUFWriter(output_file, arch=architecture.contents() if architecture else "llama")
    copied = 1
    for name, field in reader.fields.items():
        if name == ARCHITECTURE_KEY or not name.startswith(KEPT_PREFIXES):
            continue
        value_type = field.types[0]
        sub_type = field.types[1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), value_type, sub_type)
        copied += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return copied


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m pagewire.tokenizer_export MODEL.gguf TOKENIZER.gguf", file=sys.stderr)
        return 2
    output_file = Path(argv[2])
    try:
        copied = export_gguf_tokenizer(Path(argv[1]), output_file)
    except ValueError as error:
        print(f"pagewire.tokenizer_export: error: {error}", file=sys.stderr)
        return 2
    print(f"{output_file}: {copied} keys, {output_file.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
