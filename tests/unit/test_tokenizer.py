"""The scheduler's Tokenizer against transformers' AutoTokenizer on the same directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from executor_service.tiny_tokenizer import (
    BOS_TOKEN_ID,
    CHAT_TEMPLATE,
    EOS_TOKEN_ID,
    IM_START_TOKEN_ID,
    TINY_VOCAB_SIZE,
    write_tiny_tokenizer,
)
from scheduler_service.tokenizer import Tokenizer

TEXTS = (
    "",
    "hello",
    "héllo wörld ✓ 日本語 🎉",
    "  two  spaces\nand a newline",
    "<|im_start|>user\nhi<|im_end|>",
    "<|end_of_text|> in the middle <|begin_of_text|>",
)


def _tiny_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tiny"
    directory.mkdir()
    write_tiny_tokenizer(directory)
    return directory


def _edit_json(path: Path, **changes: object) -> None:
    content = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            content.pop(key, None)
        else:
            content[key] = value
    path.write_text(json.dumps(content), encoding="utf-8")


def _assert_matches_hf(directory: Path) -> Tokenizer:
    ours = Tokenizer.from_pretrained_dir(directory)
    reference = AutoTokenizer.from_pretrained(str(directory))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text)["input_ids"], text
        for skip in (True, False):
            expected = reference.decode(ids, skip_special_tokens=skip)
            assert ours.decode(ids, skip_special_tokens=skip) == expected
    assert ours.bos_token_id == reference.bos_token_id
    assert ours.eos_token_id == reference.eos_token_id
    assert ours.vocab_size == len(reference)
    return ours


def test_tiny_tokenizer_matches_hf_and_prepends_bos(tmp_path: Path) -> None:
    tokenizer = _assert_matches_hf(_tiny_dir(tmp_path))
    assert tokenizer.encode("hé ✓") == [BOS_TOKEN_ID, 104, 0xC3, 0xA9, 32, 0xE2, 0x9C, 0x93]
    assert tokenizer.encode("<|im_start|>a") == [BOS_TOKEN_ID, IM_START_TOKEN_ID, 97]
    assert tokenizer.encode_without_special_tokens("hé") == [104, 0xC3, 0xA9]
    assert tokenizer.bos_token_id == BOS_TOKEN_ID
    assert tokenizer.eos_token_id == EOS_TOKEN_ID
    assert tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.eos_token == "<|end_of_text|>"
    assert tokenizer.vocab_size == TINY_VOCAB_SIZE
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.special_token_ids == frozenset(range(256, TINY_VOCAB_SIZE))


def test_decode_keeps_or_skips_special_tokens(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_pretrained_dir(_tiny_dir(tmp_path))
    ids = [BOS_TOKEN_ID, 104, 105, EOS_TOKEN_ID]
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>hi<|end_of_text|>"
    assert tokenizer.decode([0xE6, 0x97]) == "\ufffd"
    assert tokenizer.decode([0xE6, 0x97, 0xA5]) == "日"
    assert tokenizer.is_special(EOS_TOKEN_ID) and not tokenizer.is_special(104)


def test_token_lookups_use_vocabulary_entries(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_pretrained_dir(_tiny_dir(tmp_path))
    # Byte-level vocabulary entries are GPT-2's mapped characters: the space byte is "Ġ".
    assert tokenizer.convert_ids_to_tokens([104, 32, EOS_TOKEN_ID]) == ["h", "Ġ", "<|end_of_text|>"]
    assert tokenizer.id_to_token(TINY_VOCAB_SIZE) is None
    assert tokenizer.token_to_id("<|im_end|>") == 259
    assert tokenizer.token_to_id("not a token") is None


def test_config_flags_do_not_override_the_post_processor(tmp_path: Path) -> None:
    # transformers 5 drops add_bos_token / add_eos_token whenever tokenizer.json exists.
    directory = _tiny_dir(tmp_path)
    _edit_json(directory / "tokenizer_config.json", add_bos_token=False, add_eos_token=True)
    tokenizer = _assert_matches_hf(directory)
    assert tokenizer.encode("hi") == [BOS_TOKEN_ID, 104, 105]


def test_without_post_processor_nothing_is_added_whatever_the_flags(tmp_path: Path) -> None:
    directory = _tiny_dir(tmp_path)
    _edit_json(directory / "tokenizer.json", post_processor=None)
    _edit_json(directory / "tokenizer_config.json", add_bos_token=True, add_eos_token=True)
    tokenizer = _assert_matches_hf(directory)
    assert tokenizer.encode("hi") == [104, 105]
    assert tokenizer.encode("") == []


def test_special_tokens_written_as_added_token_dicts(tmp_path: Path) -> None:
    directory = _tiny_dir(tmp_path)
    _edit_json(
        directory / "tokenizer_config.json",
        bos_token={"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
        eos_token={"__type": "AddedToken", "content": "<|im_end|>", "special": True},
    )
    tokenizer = _assert_matches_hf(directory)
    assert tokenizer.eos_token_id == 259


def test_without_tokenizer_config_only_tokenizer_json_counts(tmp_path: Path) -> None:
    directory = _tiny_dir(tmp_path)
    (directory / "tokenizer_config.json").unlink()
    (directory / "special_tokens_map.json").unlink()
    tokenizer = Tokenizer.from_pretrained_dir(directory)
    assert tokenizer.encode("hi") == [BOS_TOKEN_ID, 104, 105]
    assert tokenizer.bos_token_id is None
    assert tokenizer.eos_token_id is None
    assert tokenizer.chat_template is None


def test_special_tokens_map_supplies_missing_config_entries(tmp_path: Path) -> None:
    directory = _tiny_dir(tmp_path)
    _edit_json(directory / "tokenizer_config.json", bos_token=None, eos_token=None)
    tokenizer = Tokenizer.from_pretrained_dir(directory)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (BOS_TOKEN_ID, EOS_TOKEN_ID)


def test_chat_template_file_wins_over_the_config_entry(tmp_path: Path) -> None:
    directory = _tiny_dir(tmp_path)
    (directory / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert Tokenizer.from_pretrained_dir(directory).chat_template == "{{ messages[0]['content'] }}"


def test_named_chat_templates_pick_default(tmp_path: Path) -> None:
    directory = _tiny_dir(tmp_path)
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    _edit_json(directory / "tokenizer_config.json", chat_template=templates)
    assert Tokenizer.from_pretrained_dir(directory).chat_template == "D"


def test_missing_tokenizer_json_is_a_clear_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"tokenizer\.json not found"):
        Tokenizer.from_pretrained_dir(tmp_path)
