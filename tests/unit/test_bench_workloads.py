"""Benchmark workloads and arrival schedules: shapes, bounds and reproducibility."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks.arrivals import arrival_offsets
from benchmarks.workloads import (
    BenchRequest,
    LengthRange,
    random_requests,
    shared_prefix_requests,
    sharegpt_requests,
)
from executor_service.tiny_tokenizer import write_tiny_tokenizer


def test_length_range_parses_a_fixed_length_and_a_range() -> None:
    assert LengthRange.parse("64") == LengthRange(64, 64)
    assert LengthRange.parse("16:256") == LengthRange(16, 256)
    with pytest.raises(ValueError, match="N or MIN:MAX"):
        LengthRange.parse("a:b")
    with pytest.raises(ValueError, match="1 <= low <= high"):
        LengthRange.parse("9:3")


def test_random_requests_are_reproducible_and_inside_their_ranges() -> None:
    requests = random_requests(50, LengthRange(32, 256), LengthRange(16, 256), vocab_size=1000, seed=3)
    assert requests == random_requests(
        50, LengthRange(32, 256), LengthRange(16, 256), vocab_size=1000, seed=3
    )
    assert requests != random_requests(
        50, LengthRange(32, 256), LengthRange(16, 256), vocab_size=1000, seed=4
    )
    assert all(32 <= len(r.prompt_token_ids) <= 256 for r in requests)
    assert all(16 <= r.max_tokens <= 256 for r in requests)
    assert all(0 <= t < 1000 for r in requests for t in r.prompt_token_ids)
    assert len({len(r.prompt_token_ids) for r in requests}) > 10


def test_workloads_with_the_same_seed_share_prompts_whatever_their_output_lengths() -> None:
    a = random_requests(8, LengthRange(32, 256), LengthRange(64, 64), vocab_size=32000, seed=0)
    b = random_requests(8, LengthRange(32, 256), LengthRange(16, 256), vocab_size=32000, seed=0)
    assert [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]
    assert {r.max_tokens for r in a} == {64}
    assert len({r.max_tokens for r in b}) > 1


def test_shared_prefix_requests_start_with_the_same_tokens_then_differ() -> None:
    requests = shared_prefix_requests(6, 40, LengthRange(5, 9), LengthRange(8, 8), vocab_size=500, seed=1)
    prefix = requests[0].prompt_token_ids[:40]
    assert all(r.prompt_token_ids[:40] == prefix for r in requests)
    assert all(5 <= len(r.prompt_token_ids) - 40 <= 9 for r in requests)
    assert len({r.prompt_token_ids[40:] for r in requests}) == 6


def test_a_request_needs_exactly_one_kind_of_prompt() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        BenchRequest(max_tokens=4)
    with pytest.raises(ValueError, match="exactly one"):
        BenchRequest(max_tokens=4, prompt_token_ids=(1,), prompt_text="x")
    assert BenchRequest(max_tokens=4, prompt_text="hi").num_prompt_tokens is None


def _sharegpt_file(path: Path) -> Path:
    conversations = [
        {
            "id": "a",
            "conversations": [
                {"from": "human", "value": "Hello there, how are you?"},
                {"from": "gpt", "value": "Fine, thanks for asking!"},
            ],
        },
        {
            "id": "short",
            "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}],
        },
        {"id": "one-turn", "conversations": [{"from": "human", "value": "Is anyone there at all?"}]},
        {
            "id": "b",
            "conversations": [
                {"from": "human", "value": "Tell me a story."},
                {"from": "gpt", "value": "Once upon a time."},
                {"from": "human", "value": "More!"},
            ],
        },
    ]
    file = path / "sharegpt.json"
    file.write_text(json.dumps(conversations))
    return file


def test_sharegpt_requests_take_first_turns_and_filter_like_vllm(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    requests = sharegpt_requests(_sharegpt_file(tmp_path), tmp_path, num_requests=2, seed=0)
    # "Hi" is 3 tokens with bos (< 4) and is dropped; a single-turn conversation has no reply.
    by_prompt = {r.prompt_text: r.max_tokens for r in requests}
    assert by_prompt == {
        "Hello there, how are you?": len("Fine, thanks for asking!"),
        "Tell me a story.": len("Once upon a time."),
    }
    fixed = sharegpt_requests(_sharegpt_file(tmp_path), tmp_path, num_requests=2, seed=0, output_len=7)
    assert {r.max_tokens for r in fixed} == {7}
    with pytest.raises(ValueError, match="only 2 usable conversations"):
        sharegpt_requests(_sharegpt_file(tmp_path), tmp_path, num_requests=3, seed=0)


def test_sharegpt_requests_need_a_local_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        sharegpt_requests(tmp_path / "missing.json", tmp_path, num_requests=1, seed=0)


def test_all_at_once_sends_everything_at_zero() -> None:
    assert arrival_offsets(4, math.inf, seed=0) == (0.0, 0.0, 0.0, 0.0)


def test_poisson_arrivals_are_reproducible_with_the_requested_mean_rate() -> None:
    offsets = arrival_offsets(4000, request_rate=8.0, seed=5)
    assert offsets == arrival_offsets(4000, request_rate=8.0, seed=5)
    assert offsets != arrival_offsets(4000, request_rate=8.0, seed=6)
    assert offsets[0] == 0.0 and list(offsets) == sorted(offsets)
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 8.0, rel=0.06)
    with pytest.raises(ValueError, match="must be positive"):
        arrival_offsets(3, request_rate=0.0, seed=0)


def test_tiny_tokenizer_bos_is_counted_in_sharegpt_prompts(tmp_path: Path) -> None:
    write_tiny_tokenizer(tmp_path)
    file = tmp_path / "one.json"
    file.write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "abc"}, {"from": "gpt", "value": "defg"}]}])
    )
    # "abc" is bos + 3 bytes = 4 tokens: exactly the minimum, so it is kept.
    assert sharegpt_requests(file, tmp_path, num_requests=1, seed=0) == [BenchRequest(4, prompt_text="abc")]
