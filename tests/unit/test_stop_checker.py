"""StopChecker: vLLM's stop rules, exact per-delta tokens and text."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from executor_service.tiny_tokenizer import EOS_TOKEN_ID, write_tiny_tokenizer
from scheduler_service.detokenizer import IncrementalDetokenizer
from scheduler_service.stop_checker import FinishReason, StopChecker, StopDecision, TokenVerdict
from scheduler_service.tokenizer import Tokenizer
from shared.sampling_params import SamplingParams

EOS = 2
MAX_MODEL_LEN = 1000


def _checker(num_prompt_tokens: int = 4, max_model_len: int = MAX_MODEL_LEN, **params: object) -> StopChecker:
    return StopChecker(SamplingParams(**params), (EOS,), max_model_len, num_prompt_tokens)


def _check(checker: StopChecker, token_ids: list[int], text: str) -> StopDecision:
    decision = checker.check(token_ids, text)
    checker.check_integrity()
    return decision


def test_running_delta_passes_everything_through() -> None:
    checker = _checker()
    assert _check(checker, [7, 8], "ab") == StopDecision(None, 2, "ab")
    assert checker.num_output_tokens == 2 and not checker.is_finished
    assert checker.flush() == ""


def test_eos_stops_and_its_id_but_not_its_text_is_emitted() -> None:
    checker = _checker()
    assert checker.scan_tokens([7, EOS, 9]) == TokenVerdict(2, 1, FinishReason.STOP, EOS)
    assert _check(checker, [7, EOS, 9], "a") == StopDecision(FinishReason.STOP, 2, "a", EOS)
    assert checker.finish_reason is FinishReason.STOP and checker.num_output_tokens == 2
    with pytest.raises(RuntimeError, match="already finished"):
        checker.check([1], "x")


def test_ignore_eos_runs_to_max_tokens() -> None:
    checker = _checker(ignore_eos=True, max_tokens=3)
    assert _check(checker, [EOS], "") == StopDecision(None, 1, "")
    assert _check(checker, [EOS, EOS, EOS], "") == StopDecision(FinishReason.LENGTH, 2, "")


def test_stop_token_ids_stop_with_the_id_as_reason() -> None:
    checker = _checker(stop_token_ids=(11, 12))
    assert _check(checker, [7], "a") == StopDecision(None, 1, "a")
    assert checker.scan_tokens([12, 7]) == TokenVerdict(1, 0, FinishReason.STOP, 12)
    assert _check(checker, [12, 7], "") == StopDecision(FinishReason.STOP, 1, "", 12)


def test_max_tokens_is_length_at_exactly_that_token() -> None:
    checker = _checker(max_tokens=3)
    assert _check(checker, [5, 6], "ab") == StopDecision(None, 2, "ab")
    assert checker.scan_tokens([7, 8, 9]) == TokenVerdict(1, 1, FinishReason.LENGTH, None)
    assert _check(checker, [7, 8, 9], "c") == StopDecision(FinishReason.LENGTH, 1, "c")


def test_eos_at_the_last_allowed_token_reports_stop() -> None:
    checker = _checker(max_tokens=2)
    assert _check(checker, [5, EOS], "a") == StopDecision(FinishReason.STOP, 2, "a", EOS)


def test_max_model_len_is_length() -> None:
    checker = _checker(num_prompt_tokens=10, max_model_len=13)
    assert _check(checker, [5, 6], "ab") == StopDecision(None, 2, "ab")
    assert _check(checker, [7, 8], "c") == StopDecision(FinishReason.LENGTH, 1, "c")


def test_min_tokens_ignores_eos_and_stop_ids_before_the_min_tokens_th_token() -> None:
    checker = _checker(min_tokens=3, stop_token_ids=(11,))
    assert checker.scan_tokens([EOS, 11, EOS]) == TokenVerdict(3, 2, FinishReason.STOP, EOS)
    assert _check(checker, [EOS, 11], "") == StopDecision(None, 2, "")
    assert _check(checker, [11], "") == StopDecision(FinishReason.STOP, 1, "", 11)


def test_min_tokens_ignores_stop_strings_in_text_before_the_boundary() -> None:
    checker = _checker(min_tokens=2, stop=("b",))
    assert _check(checker, [5], "ab") == StopDecision(None, 1, "ab")
    assert _check(checker, [6], "cb") == StopDecision(None, 1, "cb")
    assert _check(checker, [7], "dbe") == StopDecision(FinishReason.STOP, 1, "d", "b")


def test_min_tokens_ignores_a_stop_string_still_withheld_from_before_the_boundary() -> None:
    checker = _checker(min_tokens=1, stop=("b", "long"))
    assert _check(checker, [5], "ab") == StopDecision(None, 1, "")
    assert _check(checker, [6], "c") == StopDecision(None, 1, "")
    assert _check(checker, [7], "bd") == StopDecision(FinishReason.STOP, 1, "abc", "b")


def test_a_stop_string_may_start_before_the_min_tokens_boundary() -> None:
    checker = _checker(min_tokens=2, stop=("cd",))
    assert _check(checker, [5], "ab") == StopDecision(None, 1, "a")
    assert _check(checker, [6], "c") == StopDecision(None, 1, "b")
    assert _check(checker, [7], "d") == StopDecision(FinishReason.STOP, 1, "", "cd")


def test_stop_string_across_deltas_is_cut_and_never_emitted() -> None:
    checker = _checker(stop=("STOP",))
    assert _check(checker, [1], "abcS") == StopDecision(None, 1, "a")
    assert _check(checker, [6], "TO") == StopDecision(None, 1, "bc")
    assert _check(checker, [3, 4], "Px") == StopDecision(FinishReason.STOP, 2, "", "STOP")
    assert checker.flush() == ""


def test_withheld_text_is_released_by_flush() -> None:
    checker = _checker(stop=("xyz", "q"))
    assert _check(checker, [1], "hello") == StopDecision(None, 1, "hel")
    assert checker.flush() == "lo"
    assert checker.flush() == ""


def test_a_length_finish_releases_the_withheld_text() -> None:
    checker = _checker(stop=("xyz",), max_tokens=2)
    assert _check(checker, [1], "ab") == StopDecision(None, 1, "")
    assert _check(checker, [6], "cx") == StopDecision(FinishReason.LENGTH, 1, "abcx")


def test_a_stop_string_before_a_stop_token_in_the_same_delta_wins() -> None:
    checker = _checker(stop=("b",))
    assert _check(checker, [5, 6, EOS], "abc") == StopDecision(FinishReason.STOP, 3, "a", "b")


def test_the_first_stop_string_to_complete_wins_and_ties_go_to_the_longer() -> None:
    first_to_complete = _check(_checker(stop=("abcd", "c")), [1], "xabcd")
    assert first_to_complete == StopDecision(FinishReason.STOP, 1, "xab", "c")
    longer_on_a_tie = _check(_checker(stop=("bc", "abc")), [1], "xabcd")
    assert longer_on_a_tie == StopDecision(FinishReason.STOP, 1, "x", "abc")


def _reference_cut(text: str, stops: tuple[str, ...]) -> str:
    """Reads `text` one character at a time and cuts at the first stop string to complete."""
    for end in range(1, len(text) + 1):
        matched = [stop for stop in stops if text[:end].endswith(stop)]
        if matched:
            return text[: end - max(len(stop) for stop in matched)]
    return text


@pytest.mark.parametrize("seed", range(20))
def test_emitted_text_does_not_depend_on_how_the_text_is_split(seed: int) -> None:
    rng = random.Random(seed)
    text = "".join(rng.choice("abc") for _ in range(60))
    num_stops = rng.randint(1, 3)
    stops = tuple("".join(rng.choice("abc") for _ in range(rng.randint(2, 5))) for _ in range(num_stops))
    checker = _checker(stop=stops)
    emitted: list[str] = []
    start = 0
    while start < len(text) and not checker.is_finished:
        size = rng.randint(0, 4)
        emitted.append(_check(checker, [1], text[start : start + size]).text_to_emit)
        start += size
    emitted.append(checker.flush())
    assert "".join(emitted) == _reference_cut(text, stops)


def _run_engine_recipe(
    tokenizer: Tokenizer, checker: StopChecker, output_ids: list[int], seed: int
) -> tuple[str, list[int]]:
    """The engine's per-delta sequence from stop_checker's module docstring, with random delta sizes."""
    rng = random.Random(seed)
    detokenizer = IncrementalDetokenizer(tokenizer, tokenizer.encode("prompt: "), skip_special_tokens=False)
    text = ""
    emitted_ids: list[int] = []
    start = 0
    while not checker.is_finished:
        ids = output_ids[start : start + rng.randint(1, 4)]
        verdict = checker.scan_tokens(ids)
        new_text = detokenizer.push(ids[: verdict.num_tokens_to_detokenize])
        if verdict.finish_reason is not None:
            new_text += detokenizer.flush()
        decision = _check(checker, ids, new_text)
        text += decision.text_to_emit
        emitted_ids += ids[: decision.num_tokens_to_emit]
        start += len(ids)
    return text, emitted_ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory: Path = tmp_path_factory.mktemp("tiny")
    write_tiny_tokenizer(directory)
    return Tokenizer.from_pretrained_dir(directory)


@pytest.mark.parametrize("seed", range(5))
def test_with_the_detokenizer_a_multibyte_stop_string_cuts_exactly(tiny: Tokenizer, seed: int) -> None:
    output_ids = tiny.encode_without_special_tokens("héllo wörld ✓ 日本語 🎉 and more") + [EOS_TOKEN_ID]
    checker = StopChecker(SamplingParams(stop=("本語 🎉", "zzz")), (EOS_TOKEN_ID,), MAX_MODEL_LEN, 9)
    text, emitted_ids = _run_engine_recipe(tiny, checker, output_ids, seed)
    assert text == "héllo wörld ✓ 日"
    assert checker.finish_reason is FinishReason.STOP
    # Every token of the delta (at most 4) that completes the stop string is emitted, none after it.
    num_tokens_through_stop = len("héllo wörld ✓ 日本語 🎉".encode())
    assert emitted_ids == output_ids[: len(emitted_ids)]
    assert num_tokens_through_stop <= len(emitted_ids) <= num_tokens_through_stop + 3


@pytest.mark.parametrize("seed", range(5))
def test_with_the_detokenizer_eos_text_never_appears(tiny: Tokenizer, seed: int) -> None:
    output_ids = tiny.encode_without_special_tokens("wörld ✓") + [EOS_TOKEN_ID] + [0x61] * 4
    checker = StopChecker(SamplingParams(stop=("xyz",)), (EOS_TOKEN_ID,), MAX_MODEL_LEN, 9)
    text, emitted_ids = _run_engine_recipe(tiny, checker, output_ids, seed)
    assert text == "wörld ✓"
    assert emitted_ids == output_ids[: len("wörld ✓".encode()) + 1]
    assert checker.finish_reason is FinishReason.STOP
