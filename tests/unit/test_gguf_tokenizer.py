"""The tokenizer rebuilt from GGUF metadata encodes and decodes exactly as transformers' GGUF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagewire.default_model import default_model
from scheduler_service.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\r\n\n\nand    runs      of spaces",
    "Digits 0 12 345 6789 3.14159 1,000,000 2024-01-31",
    "Unicode: naïve café Ünïcödé — “quotes” ‘single’ …",
    "CJK 日本語のテキスト 中文 한국어",
    "Emoji 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️",
    "Special tokens in text: <|im_start|>user\nhi<|im_end|> <|endoftext|> <repo_name>",
    "code: def f(x):\n    return x ** 2  # square\n",
    "'s 't 're 've 'm 'll 'd I'M YOU'LL",
    "",
    " ",
    "\u00a0non-breaking\u2009thin space\u200bzero width",
]
MESSAGES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Count: 1 2 3 😀"},
        {"role": "assistant", "content": "4 5 6"},
        {"role": "user", "content": "More?"},
    ],
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_model()


@pytest.fixture(scope="module")
def reference(gguf_path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def tokenizer(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_model_path(gguf_path)


def _texts(reference: PreTrainedTokenizerBase) -> list[str]:
    rendered = [
        reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        for messages in MESSAGES
    ]
    return TEXTS + rendered


def test_backend_serializes_exactly_as_transformers_builds_it(
    tokenizer: Tokenizer, reference: PreTrainedTokenizerBase
) -> None:
    assert json.loads(tokenizer._backend.to_str()) == json.loads(reference.backend_tokenizer.to_str())


def test_encode_equals_transformers(tokenizer: Tokenizer, reference: PreTrainedTokenizerBase) -> None:
    for text in _texts(reference):
        assert tokenizer.encode(text) == reference(text).input_ids, text
        without_special = reference(text, add_special_tokens=False).input_ids
        assert tokenizer.encode_without_special_tokens(text) == without_special


def test_decode_equals_transformers(tokenizer: Tokenizer, reference: PreTrainedTokenizerBase) -> None:
    for text in _texts(reference):
        ids = reference(text).input_ids
        for skip in (True, False):
            expected = reference.decode(ids, skip_special_tokens=skip)
            assert tokenizer.decode(ids, skip_special_tokens=skip) == expected
    # A lone byte of a multi-byte character, and every id at the vocabulary's ends.
    ids = [*reference("😀").input_ids[:1], 0, 1, 2, 16, 17, 49151]
    expected = reference.decode(ids, skip_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == expected


def test_special_tokens_and_chat_template_come_from_the_file(
    tokenizer: Tokenizer, reference: PreTrainedTokenizerBase
) -> None:
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.bos_token, tokenizer.eos_token) == (reference.bos_token, reference.eos_token)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.chat_template == reference.chat_template
    assert tokenizer.vocab_size == len(reference) == 49152
    assert tokenizer.special_token_ids == frozenset(range(17))


@pytest.fixture(scope="module")
def source(gguf_path: Path) -> dict[str, list]:
    """SmolLM2's tokens, token types and merges, read once."""
    reader = gguf.GGUFReader(gguf_path)
    keys = ("tokens", "token_type", "merges")
    return {key: list(reader.fields[f"tokenizer.ggml.{key}"].contents()) for key in keys}


def _write_tokenizer_gguf(path: Path, source: dict[str, list], **overrides: object) -> Path:
    """A GGUF file with SmolLM2's vocabulary and merges plus the given tokenizer metadata.

    `retype` maps token ids to (new text or None to keep it, llama.cpp token type).
    """
    tokens, types = list(source["tokens"]), list(source["token_type"])
    retype: dict[int, tuple[str | None, int]] = overrides.pop("retype", {})  # type: ignore[assignment]
    for token_id, (token, token_type) in retype.items():
        tokens[token_id], types[token_id] = token or tokens[token_id], token_type
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(str(overrides.get("model", "gpt2")))
    writer.add_tokenizer_pre(str(overrides.get("pre", "smollm")))
    writer.add_token_list(tokens)
    writer.add_token_merges(source["merges"])
    writer.add_token_types(types)
    writer.add_bos_token_id(int(overrides.get("bos", 1)))  # type: ignore[call-overload]
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(bool(overrides.get("add_bos", False)))
    writer.add_add_eos_token(bool(overrides.get("add_eos", False)))
    writer.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "overrides",
    [
        {"add_bos": True, "pre": "llama-bpe", "retype": {5: ("<think>", 4)}},
        {"add_bos": True, "add_eos": True, "bos": 0, "pre": "qwen2"},
        # 6, 7: SmolLM2 control tokens renamed; 19556 "Hello" and 905 "Ġworld" retyped in place.
        {
            "pre": "gpt-4o",
            "retype": {6: ("<tool_call>", 3), 7: ("</tool_call>", 4), 19556: (None, 3), 905: (None, 4)},
        },
    ],
    ids=["bos-llama3-split-user-token", "bos-eos-qwen2-split", "gpt4o-split-control-token"],
)
def test_tokenizer_metadata_variants_match_transformers(
    tmp_path: Path, source: dict[str, list], overrides: dict[str, object]
) -> None:
    path = _write_tokenizer_gguf(tmp_path / "variant.gguf", source, **overrides)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    tokenizer = Tokenizer.from_model_path(tmp_path)
    assert json.loads(tokenizer._backend.to_str()) == json.loads(reference.backend_tokenizer.to_str())
    for text in [*TEXTS, "<think>x</think> <tool_call>{}</tool_call> 1234567"]:
        assert tokenizer.encode(text) == reference(text).input_ids, text
    assert (tokenizer.bos_token, tokenizer.eos_token) == (reference.bos_token, reference.eos_token)
    assert tokenizer.chat_template == reference.chat_template


def test_a_sentencepiece_gguf_tokenizer_is_refused_with_the_way_out(
    tmp_path: Path, source: dict[str, list]
) -> None:
    path = _write_tokenizer_gguf(tmp_path / "spm.gguf", source, model="llama")
    with pytest.raises(ValueError, match=r"'llama' tokenizer .* --tokenizer DIR"):
        Tokenizer.from_model_path(path)


def test_model_path_dispatch(tmp_path: Path) -> None:
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.gguf").write_bytes(b"")
    (tmp_path / "two" / "b.gguf").write_bytes(b"")
    with pytest.raises(ValueError, match=r"several GGUF files \(a.gguf, b.gguf\)"):
        Tokenizer.from_model_path(tmp_path / "two")
    with pytest.raises(ValueError, match="tokenizer.json not found"):
        Tokenizer.from_model_path(tmp_path)  # neither tokenizer.json nor a .gguf file
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="not a .gguf file"):
        Tokenizer.from_model_path(tmp_path / "notes.txt")
