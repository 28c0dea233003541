"""`pagewire create-draft-model SRC DST --num-layers N`: a layer-truncated copy of a checkpoint to serve as
its own draft model (`--speculative-config '{"method": "draft_model", "model": DST, ...}'`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pagewire.model_choice import resolve_model
from shared.model_path import find_gguf_file

DEFAULT_SOURCE = "default"


def add_create_draft_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help="the checkpoint to cut: a Hugging Face directory (safetensors), a .gguf file or a "
        "directory holding one, `tiny`, or `default` (SmolLM2-135M-Instruct)",
    )
    parser.add_argument("output_dir", type=Path, help="directory to write the draft checkpoint into")
    parser.add_argument("--num-layers", type=int, required=True,
                        help="decoder layers the draft keeps, the first ones of the source")


def run_create_draft_model(args: argparse.Namespace) -> int:
    """Writes the draft checkpoint (see `write_truncated_checkpoint`), prints its path, returns 0. For a
    GGUF source, the tokenizer in its metadata is written as tokenizer.json, so transformers loads the
    copy with its tokenizer too."""
    from executor_service.model.truncated_checkpoint import write_truncated_checkpoint

    source = resolve_model(None if args.source == DEFAULT_SOURCE else args.source)
    output_path = write_truncated_checkpoint(source, args.output_dir, args.num_layers)
    gguf_file = find_gguf_file(source)
    if gguf_file is not None:
        _write_gguf_tokenizer(gguf_file, output_path)
    print(output_path)
    return 0


def _write_gguf_tokenizer(gguf_file: Path, output_path: Path) -> None:
    from scheduler_service.gguf_tokenizer import read_gguf_tokenizer

    parts = read_gguf_tokenizer(gguf_file)
    parts.backend.save(str(output_path / "tokenizer.json"))
    config: dict[str, object] = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": parts.bos_token,
                                 "eos_token": parts.eos_token}
    if parts.chat_template is not None:
        config["chat_template"] = parts.chat_template
    (output_path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
