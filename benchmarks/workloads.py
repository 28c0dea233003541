"""Benchmark workloads: random-token prompts, a shared-prefix set and a local ShareGPT-layout dataset."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from scheduler_service.tokenizer import Tokenizer

# vLLM's ShareGPT filter: drop very short turns and pairs too long for a 2048-token context.
SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class LengthRange:
    """Lengths drawn uniformly from [low, high], both included; low == high is a fixed length."""

    low: int
    high: int

    def __post_init__(self) -> None:
        if not 1 <= self.low <= self.high:
            raise ValueError(f"a length range needs 1 <= low <= high, got [{self.low}, {self.high}]")

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        """'64' is exactly 64; '32:256' is uniform in [32, 256]."""
        low, _, high = text.partition(":")
        try:
            return cls(int(low), int(high or low))
        except ValueError as error:
            raise ValueError(f"a length is N or MIN:MAX with integers, got {text!r} ({error})") from error

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request: a prompt given as token ids or as text (exactly one), and its output length.

    With `ignore_eos` the server generates exactly `max_tokens`; otherwise at most that many.
    """

    max_tokens: int
    prompt_token_ids: tuple[int, ...] = ()
    prompt_text: str = ""

    def __post_init__(self) -> None:
        if bool(self.prompt_token_ids) == bool(self.prompt_text):
            raise ValueError("a request needs exactly one of prompt_token_ids and prompt_text")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")

    @property
    def num_prompt_tokens(self) -> int | None:
        """Known for token-id prompts; a text prompt's count comes back in the server's usage."""
        return len(self.prompt_token_ids) if self.prompt_token_ids else None


def random_requests(
    num_requests: int, input_len: LengthRange, output_len: LengthRange, vocab_size: int, seed: int
) -> list[BenchRequest]:
    """Prompts of uniformly random token ids in [0, vocab_size); the same seed gives the same list.

    Prompts and output lengths come from two generators, so two workloads with the same seed and input
    range share their prompts whatever their output ranges are.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    prompt_rng, output_rng = random.Random(seed), random.Random(seed + 1)
    requests: list[BenchRequest] = []
    for _ in range(num_requests):
        prompt = tuple(prompt_rng.randrange(vocab_size) for _ in range(input_len.draw(prompt_rng)))
        requests.append(BenchRequest(max_tokens=output_len.draw(output_rng), prompt_token_ids=prompt))
    return requests


def shared_prefix_requests(
    num_requests: int,
    prefix_len: int,
    suffix_len: LengthRange,
    output_len: LengthRange,
    vocab_size: int,
    seed: int,
) -> list[BenchRequest]:
    """`num_requests` prompts that all start with the same `prefix_len` random tokens, then differ."""
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0, got {prefix_len}")
    rng = random.Random(seed)
    prefix = tuple(rng.randrange(vocab_size) for _ in range(prefix_len))
    requests: list[BenchRequest] = []
    for _ in range(num_requests):
        suffix = tuple(rng.randrange(vocab_size) for _ in range(suffix_len.draw(rng)))
        requests.append(BenchRequest(max_tokens=output_len.draw(rng), prompt_token_ids=prefix + suffix))
    return requests


def sharegpt_requests(
    path: str | Path, tokenizer_dir: str | Path, num_requests: int, seed: int, output_len: int | None = None
) -> list[BenchRequest]:
    """The first human turn of each conversation as a text prompt, the reply's token count as output length.

    Reads a local JSON list in the ShareGPT layout (`[{"conversations": [{"from": "human", "value": ...},
    {"from": "gpt", "value": ...}, ...]}, ...]`); nothing is downloaded. Conversations are shuffled with
    `seed`, filtered like vLLM's benchmark, and the first `num_requests` kept. `output_len` overrides
    the reply lengths.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"dataset {file} not found: pass a local ShareGPT-layout JSON file")
    conversations = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(conversations, list):
        raise ValueError(f"{file} must hold a JSON list of conversations")
    tokenizer = Tokenizer.from_pretrained_dir(tokenizer_dir)
    pairs = [
        (turns[0]["value"], turns[1]["value"])
        for entry in conversations
        if isinstance(entry, dict)
        and len(turns := entry.get("conversations") or []) >= 2
        and isinstance(turns[0].get("value"), str)
        and isinstance(turns[1].get("value"), str)
    ]
    random.Random(seed).shuffle(pairs)
    requests: list[BenchRequest] = []
    for prompt, reply in pairs:
        if len(requests) == num_requests:
            break
        num_prompt_tokens = len(tokenizer.encode(prompt))
        num_output_tokens = output_len or len(tokenizer.encode_without_special_tokens(reply))
        if num_prompt_tokens < SHAREGPT_MIN_TOKENS or num_output_tokens < SHAREGPT_MIN_TOKENS:
            continue
        if num_prompt_tokens > SHAREGPT_MAX_PROMPT_TOKENS:
            continue
        if num_prompt_tokens + num_output_tokens > SHAREGPT_MAX_TOTAL_TOKENS:
            continue
        requests.append(BenchRequest(max_tokens=num_output_tokens, prompt_text=prompt))
    if len(requests) < num_requests:
        raise ValueError(
            f"{file} has only {len(requests)} usable conversations, {num_requests} were asked for"
        )
    return requests
