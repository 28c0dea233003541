"""A Hugging Face tokenizer directory or a GGUF file's tokenizer, run by the `tokenizers` library alone
(no transformers, no torch)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import tokenizers

from scheduler_service.gguf_tokenizer import read_gguf_tokenizer
from shared.model_path import find_gguf_file

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


class Tokenizer:
    """Encodes and decodes exactly as `transformers.AutoTokenizer` does for the same directory.

    `encode` adds the special tokens HF's `tokenizer(text)` adds, which tokenizer.json's post-processor
    alone decides: transformers 5 drops `add_bos_token` / `add_eos_token` from tokenizer_config.json
    whenever a tokenizer.json exists, and adds nothing when it has no post-processor. `decode` never
    applies `clean_up_tokenization_spaces`: a clean-up would make decoding a window differ from decoding
    the whole, which the incremental detokenizer relies on.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
    ) -> None:
        self._backend = backend
        self._bos_token = bos_token
        self._eos_token = eos_token
        self._chat_template = chat_template
        self._special_token_ids = frozenset(
            token_id for token_id, token in backend.get_added_tokens_decoder().items() if token.special
        )

    @classmethod
    def from_model_path(cls, path: str | Path) -> Tokenizer:
        """A directory with tokenizer.json (Hugging Face), else a `.gguf` file or a directory holding one
        (the tokenizer in the GGUF metadata, as `AutoTokenizer.from_pretrained(dir, gguf_file=...)`)."""
        if Path(path).is_dir() and (Path(path) / TOKENIZER_FILE).is_file():
            return cls.from_pretrained_dir(path)
        gguf_file = find_gguf_file(path)
        if gguf_file is None:
            return cls.from_pretrained_dir(path)
        return cls.from_gguf_file(gguf_file)

    @classmethod
    def from_gguf_file(cls, path: str | Path) -> Tokenizer:
        """The tokenizer, special tokens and chat template in a GGUF file's metadata."""
        parts = read_gguf_tokenizer(path)
        return cls(parts.backend, parts.bos_token, parts.eos_token, parts.chat_template)

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> Tokenizer:
        """Loads `tokenizer.json` plus, when present, tokenizer_config.json, special_tokens_map.json and
        chat_template.jinja. Raises ValueError when the directory or tokenizer.json is missing."""
        directory = Path(path)
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise ValueError(
                f"{tokenizer_file} not found: point the model path at a Hugging Face model directory that "
                f"contains {TOKENIZER_FILE} (slow-only tokenizers such as a bare tokenizer.model are not "
                "supported; convert them with transformers' save_pretrained first)"
            )
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(directory / TOKENIZER_CONFIG_FILE)
        special_tokens_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE)
        bos_token = _token_content(config.get("bos_token", special_tokens_map.get("bos_token")))
        eos_token = _token_content(config.get("eos_token", special_tokens_map.get("eos_token")))
        return cls(backend, bos_token, eos_token, _chat_template(directory, config))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with the special tokens (e.g. BOS) HF's `tokenizer(text)` adds."""
        return self._backend.encode(text, add_special_tokens=True).ids

    def encode_without_special_tokens(self, text: str) -> list[int]:
        """Token ids of `text` alone, e.g. for a rendered chat template that already holds BOS."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `token_ids`; an incomplete UTF-8 character decodes to U+FFFD."""
        return self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (not the text: byte-level entries are mapped characters) or None."""
        return self._backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, token_ids: Sequence[int]) -> list[str | None]:
        return [self._backend.id_to_token(token_id) for token_id in token_ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        """Whether `decode(..., skip_special_tokens=True)` drops this id."""
        return token_id in self._special_token_ids

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_token_ids

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (HF's `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str | None:
        return self._bos_token

    @property
    def eos_token(self) -> str | None:
        return self._eos_token

    @property
    def bos_token_id(self) -> int | None:
        return None if self._bos_token is None else self._backend.token_to_id(self._bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self._eos_token is None else self._backend.token_to_id(self._eos_token)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template text, or None when the directory has none."""
        return self._chat_template


def _read_json(path: Path) -> dict[str, object]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as file:
        content = json.load(file)
    if not isinstance(content, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(content).__name__}")
    return content


def _token_content(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"cannot read a special token from {value!r}; expected a string or {{'content': ...}}")


def _chat_template(directory: Path, config: dict[str, object]) -> str | None:
    """chat_template.jinja wins over the config entry, as in transformers; a named list picks "default"."""
    template_file = directory / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
