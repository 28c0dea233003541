"""IncrementalDetokenizer: deltas whose concatenation is the decoded output, over a bounded window."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers

from executor_service.tiny_tokenizer import EOS_TOKEN_ID, IM_START_TOKEN_ID, write_tiny_tokenizer
from scheduler_service.detokenizer import MAX_PENDING_TOKENS, IncrementalDetokenizer
from scheduler_service.tokenizer import Tokenizer

TEXT = "héllo wörld ✓ 日本語 🎉"


class RecordingTokenizer(Tokenizer):
    """A real tokenizer that also records how many ids each decode call gets."""

    decode_lengths: list[int]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.decode_lengths.append(len(token_ids))
        return super().decode(token_ids, skip_special_tokens)


def _load(directory: Path) -> RecordingTokenizer:
    tokenizer = RecordingTokenizer.from_pretrained_dir(directory)
    tokenizer.decode_lengths = []
    return tokenizer


@pytest.fixture
def tiny(tmp_path: Path) -> RecordingTokenizer:
    write_tiny_tokenizer(tmp_path)
    return _load(tmp_path)


@pytest.fixture
def merged_bpe(tmp_path: Path) -> RecordingTokenizer:
    """Byte-level BPE with merges, some of which end in the middle of a multi-byte character."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [TEXT + " the quick brown fox"] * 50 + ["日本 本語 語日 🎉🎉 wörter héhé"] * 50
    backend.train_from_iterator(corpus, trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return _load(tmp_path)


@pytest.fixture
def sentencepiece_like(tmp_path: Path) -> RecordingTokenizer:
    """Llama-2 style: "▁" marks spaces, byte fallback, and decoding strips the text's leading space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for piece in ("▁", "h", "i", "▁h", "▁hi"):
        vocab[piece] = len(vocab)
    backend = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=[("▁", "h"), ("▁h", "i")], unk_token="<unk>", byte_fallback=True)
    )
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.add_special_tokens([AddedToken(token, special=True) for token in ("<unk>", "<s>", "</s>")])
    backend.save(str(tmp_path / "tokenizer.json"))
    return _load(tmp_path)


def _push_in_chunks(
    detokenizer: IncrementalDetokenizer, token_ids: Sequence[int], rng: random.Random | None
) -> list[str]:
    deltas: list[str] = []
    start = 0
    while start < len(token_ids):
        size = 1 if rng is None else rng.randint(1, 5)
        deltas.append(detokenizer.push(token_ids[start : start + size]))
        detokenizer.check_integrity()
        start += size
    return deltas


def test_byte_tokens_release_a_character_when_its_last_byte_arrives(tiny: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tiny, tiny.encode("x"))
    assert [detokenizer.push([token]) for token in tiny.encode_without_special_tokens("hé✓🎉")] == [
        "h", "", "é", "", "", "✓", "", "", "", "🎉",
    ]  # fmt: skip
    assert detokenizer.flush() == ""


@pytest.mark.parametrize("tokenizer_name", ["tiny", "merged_bpe"])
@pytest.mark.parametrize("seed", [None, 0, 1, 2])
def test_pushes_concatenate_to_the_decoded_output(
    tokenizer_name: str, seed: int | None, request: pytest.FixtureRequest
) -> None:
    tokenizer: Tokenizer = request.getfixturevalue(tokenizer_name)
    prompt_ids = tokenizer.encode("Say: ")
    output_ids = tokenizer.encode_without_special_tokens(TEXT)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = _push_in_chunks(detokenizer, output_ids, None if seed is None else random.Random(seed))
    assert "".join(deltas) == TEXT == tokenizer.decode(output_ids)
    assert all("\ufffd" not in delta for delta in deltas)
    assert detokenizer.flush() == ""


def test_merged_bpe_really_splits_characters(merged_bpe: Tokenizer) -> None:
    pieces = [merged_bpe.decode([token]) for token in merged_bpe.encode_without_special_tokens(TEXT)]
    assert any("\ufffd" in piece for piece in pieces)
    assert any(len(piece) > 1 and "\ufffd" not in piece for piece in pieces)


def test_output_ending_mid_character_is_withheld_until_flush(tiny: Tokenizer) -> None:
    output_ids = tiny.encode_without_special_tokens("ok 日本")[:-1]
    detokenizer = IncrementalDetokenizer(tiny, [])
    assert "".join(_push_in_chunks(detokenizer, output_ids, None)) == "ok 日"
    assert detokenizer.num_pending_tokens == 2
    assert detokenizer.flush() == "\ufffd" == tiny.decode(output_ids)[len("ok 日") :]
    assert detokenizer.flush() == ""


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_bytes_match_decode_with_a_bounded_window(tiny: RecordingTokenizer, seed: int) -> None:
    rng = random.Random(seed)
    # Mostly non-ASCII bytes: invalid sequences, lone continuation bytes and real multi-byte characters.
    output_ids = [rng.choice((rng.randrange(0x80, 0x100), rng.randrange(0x20, 0x80))) for _ in range(3000)]
    output_ids[500:520] = [0x80] * 20  # a run of lone continuation bytes forces the settled-prefix release
    detokenizer = IncrementalDetokenizer(tiny, tiny.encode("prompt"))
    tiny.decode_lengths.clear()
    text = "".join(_push_in_chunks(detokenizer, output_ids, rng)) + detokenizer.flush()
    assert max(tiny.decode_lengths) <= 2 * (MAX_PENDING_TOKENS + 5)
    assert text == tiny.decode(output_ids)


def test_one_token_pushes_never_hold_more_than_max_pending_tokens(tiny: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tiny, [])
    texts = []
    for _ in range(40):
        texts.append(detokenizer.push([0x80]))
        assert detokenizer.num_pending_tokens <= MAX_PENDING_TOKENS
    assert "".join(texts) + detokenizer.flush() == "\ufffd" * 40


def test_special_tokens_are_skipped_and_never_enter_the_window(tiny: RecordingTokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tiny, tiny.encode("q"))
    assert detokenizer.push([104]) == "h"
    tiny.decode_lengths.clear()
    assert [detokenizer.push([IM_START_TOKEN_ID]) for _ in range(100)] == [""] * 100
    assert detokenizer.num_pending_tokens == 0
    assert detokenizer.push([105, EOS_TOKEN_ID]) == "i"
    assert max(tiny.decode_lengths, default=0) <= 2
    detokenizer.check_integrity()


def test_special_tokens_are_kept_when_asked(tiny: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tiny, tiny.encode("q"), skip_special_tokens=False)
    assert detokenizer.push([104]) == "h"
    assert detokenizer.push([IM_START_TOKEN_ID]) == "<|im_start|>"
    assert detokenizer.push([0xC3, 0xA9, EOS_TOKEN_ID]) == "é<|end_of_text|>"


def test_prompt_context_keeps_a_sentencepiece_word_space(sentencepiece_like: Tokenizer) -> None:
    prompt_ids = sentencepiece_like.encode("hi")
    output_ids = sentencepiece_like.encode_without_special_tokens("hé hi")
    # Decoded alone, the output loses its leading space; as a continuation of the prompt it keeps it.
    assert sentencepiece_like.decode(output_ids) == "hé hi"
    for seed in (None, 0, 1):
        detokenizer = IncrementalDetokenizer(sentencepiece_like, prompt_ids)
        deltas = _push_in_chunks(detokenizer, output_ids, None if seed is None else random.Random(seed))
        assert "".join(deltas) == " hé hi"
        assert detokenizer.flush() == ""


def test_empty_prompt_and_empty_push(tiny: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tiny, [])
    assert detokenizer.push([]) == ""
    assert detokenizer.push([0x61]) == "a"
    assert detokenizer.flush() == ""
