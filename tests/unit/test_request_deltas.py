"""RequestState.next_delta: a client that reads slower than the engine steps gets the queued deltas as
one message, with exactly the same tokens, text and end, and an error only after what came before it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from executor_service.tiny_model import create_tiny_model
from scheduler_service.request_state import RequestDelta, RequestState, Usage, merge_deltas
from scheduler_service.tokenizer import Tokenizer
from shared.errors import Unavailable
from shared.sampling_params import SamplingParams
from shared.step_plan import SequenceId, SequenceOutput


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained_dir(create_tiny_model(Path(tmp_path_factory.mktemp("tiny")), seed=3))


def request(tokenizer: Tokenizer, max_tokens: int = 6) -> RequestState:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return RequestState("r", SequenceId(1), (72, 105), params, tokenizer, (2,), 100)


def output(*token_ids: int) -> SequenceOutput:
    return SequenceOutput(SequenceId(1), token_ids, logprobs=tuple(-0.5 * t for t in token_ids))


def test_merging_concatenates_in_order_and_keeps_the_last_end() -> None:
    usage = Usage(2, 3, 0)
    merged = merge_deltas([
        RequestDelta((1,), "a", (-1.0,), (((1, -1.0),),)),
        RequestDelta((2, 3), "bc", (-2.0, -3.0), (((2, -2.0),), ((3, -3.0),)), "length", usage),
    ])
    assert merged == RequestDelta((1, 2, 3), "abc", (-1.0, -2.0, -3.0),
                                  (((1, -1.0),), ((2, -2.0),), ((3, -3.0),)), "length", usage)


def test_deltas_queued_while_the_client_was_busy_arrive_as_one(tokenizer: Tokenizer) -> None:
    async def run() -> list[RequestDelta]:
        state = request(tokenizer)
        state.on_output(output(101))
        first = await state.next_delta()
        for token in (102, 103, 104):
            state.on_output(output(token))
        second = await state.next_delta()
        state.on_output(output(105, 106))  # the sixth token: the end
        return [first, second, await state.next_delta()]

    first, second, last = asyncio.run(run())
    assert (first.token_ids, second.token_ids, last.token_ids) == ((101,), (102, 103, 104), (105, 106))
    assert second.logprobs == (-51.0, -51.5, -52.0)
    assert first.text + second.text + last.text == tokenizer.decode([101, 102, 103, 104, 105, 106])
    assert (first.finish_reason, second.finish_reason, last.finish_reason) == (None, None, "length")
    assert last.usage == Usage(2, 6, 0)


def test_an_error_queued_behind_deltas_comes_after_them(tokenizer: Tokenizer) -> None:
    async def run() -> tuple[RequestDelta, BaseException]:
        state = request(tokenizer)
        state.on_output(output(101))
        state.on_output(output(102))
        state.fail(Unavailable("the executor is gone"))
        delta = await state.next_delta()
        with pytest.raises(Unavailable) as caught:
            await state.next_delta()
        return delta, caught.value

    delta, error = asyncio.run(run())
    assert delta.token_ids == (101, 102)
    assert str(error) == "the executor is gone"
