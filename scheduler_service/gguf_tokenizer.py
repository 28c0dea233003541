"""A `tokenizers.Tokenizer` built from a GGUF file's metadata, as transformers builds it (no torch).

A GGUF file has no tokenizer.json: llama.cpp's converter stores the vocabulary, merges, token types,
special token ids and chat template as metadata. This rebuilds the tokenizer transformers'
`AutoTokenizer.from_pretrained(dir, gguf_file=...)` makes of them (transformers'
integrations/gguf/gguf_tokenizer_mapping.py), for byte-level BPE files (`tokenizer.ggml.model` "gpt2":
Llama 3, Qwen2, SmolLM, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from gguf import GGUFReader
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

_CONTROL = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
_USER_DEFINED = 4

# `tokenizer.ggml.pre` -> the split regex transformers uses for it; other names keep GPT-2's ByteLevel regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class GGUFTokenizerParts:
    """What `Tokenizer` needs from a GGUF file: the backend and the special tokens' texts."""

    backend: tokenizers.Tokenizer
    bos_token: str | None
    eos_token: str | None
    chat_template: str | None


def read_gguf_tokenizer(path: str | Path) -> GGUFTokenizerParts:
    """The tokenizer the GGUF file at `path` describes; ValueError when it cannot be rebuilt."""
    try:
        reader = GGUFReader(Path(path))
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {path} as a GGUF file: {error}") from error
    metadata = _TokenizerMetadata(reader)
    tokenizer_model = metadata.get("model")
    if tokenizer_model != "gpt2":
        raise ValueError(
            f"{path} has a {tokenizer_model!r} tokenizer (tokenizer.ggml.model): pagewire builds only "
            "byte-level BPE ('gpt2') tokenizers from GGUF metadata; pass --tokenizer DIR with the model's "
            "tokenizer.json"
        )
    tokens: list[str] = metadata.get("tokens") or []
    if not tokens:
        raise ValueError(f"{path} has no tokenizer.ggml.tokens: pass --tokenizer DIR with a tokenizer.json")
    special = {
        name: metadata.token(tokens, f"{name}_token_id") for name in ("bos", "eos", "unknown", "padding")
    }
    backend = byte_level_bpe(tokens, metadata.get("merges") or [], metadata.get("token_type") or [])
    _add_named_special_tokens(backend, [token for token in special.values() if token is not None])
    backend.pre_tokenizer = _pre_tokenizer(metadata.get("pre"))
    add_bos = bool(metadata.get("add_bos_token", False)) and special["bos"] is not None
    add_eos = bool(metadata.get("add_eos_token", False)) and special["eos"] is not None
    backend.post_processor = _post_processor(backend, special["bos"], special["eos"], add_bos, add_eos)
    template = reader.fields.get("tokenizer.chat_template")
    chat_template = None if template is None else template.contents()
    return GGUFTokenizerParts(backend, special["bos"], special["eos"], chat_template)


def byte_level_bpe(tokens: list[str], merges: list[str], token_types: list[int]) -> tokenizers.Tokenizer:
    """GPT-2-style BPE over `tokens` (ids in order) and `merges` ("a b" lines), with control tokens
    as special added tokens and user-defined ones as plain added tokens, as transformers adds them."""
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode("utf-8")): index
        for index, token in enumerate(tokens)
    }
    pairs = [tuple(merge.split(" ")) for merge in merges]
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, token_types, strict=False))
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel (transformers skips it too).
    control = [token for token, kind in typed if kind == _CONTROL and set(token) <= alphabet]
    if control:
        backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in control])
    user_defined = [token for token, kind in typed if kind == _USER_DEFINED and token in vocab]
    if user_defined:
        backend.add_tokens([AddedToken(token, normalized=False, special=False) for token in user_defined])
    return backend


def _add_named_special_tokens(backend: tokenizers.Tokenizer, named: list[str]) -> None:
    """bos/eos/unk/pad become special added tokens (transformers registers them), unless already added."""
    added = {token.content for token in backend.get_added_tokens_decoder().values()}
    missing = [token for token in dict.fromkeys(named) if token not in added]
    if missing:
        backend.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in missing])


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    split = PRE_TOKENIZER_SPLITS.get(pre or "")
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _post_processor(
    backend: tokenizers.Tokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """BOS / EOS around the text per `tokenizer.ggml.add_bos_token` / `add_eos_token` (transformers'
    `update_post_processor`)."""
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special_tokens = []
    if add_bos and bos is not None:
        special_tokens.append((bos, backend.token_to_id(bos)))
    if add_eos and eos is not None:
        special_tokens.append((eos, backend.token_to_id(eos)))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


class _TokenizerMetadata:
    """The `tokenizer.ggml.*` metadata of one reader."""

    def __init__(self, reader: GGUFReader) -> None:
        self._reader = reader

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(f"tokenizer.ggml.{key}")
        return default if field is None else field.contents()

    def token(self, tokens: list[str], key: str) -> str | None:
        """The token text under the id `key` names, or None when the file names none."""
        token_id = self.get(key)
        if token_id is None:
            return None
        if not 0 <= int(token_id) < len(tokens):
            raise ValueError(
                f"tokenizer.ggml.{key} is {token_id}, outside the vocabulary of {len(tokens)} tokens"
            )
        return tokens[int(token_id)]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    characters = printable[:]
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shifted)
            shifted += 1
    return dict(zip(printable, map(chr, characters), strict=True))
