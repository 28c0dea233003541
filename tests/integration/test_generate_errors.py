"""The public Generate API's failure paths and stop rules, over real executor and scheduler processes.

Every rejected request must carry the exact status code and a message naming what to change, and the
same server must serve the next good request exactly as before.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from executor_service.tiny_model import create_tiny_model
from scheduler_service.tokenizer import Tokenizer
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import health_status, running_server

VOCAB_SIZE = 260
MAX_MODEL_LEN = 128
MAX_LOGPROBS = 20
RPC_TIMEOUT_SECONDS = 30.0
GOOD_PROMPT = (72, 101, 108, 108, 111)
LONG_MAX_TOKENS = 3000


@dataclass(frozen=True, slots=True)
class Generation:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    responses: list[pb.GenerateResponse]

    @property
    def finish_reason(self) -> int:
        return self.responses[-1].finish_reason

    @property
    def usage(self) -> pb.Usage:
        return self.responses[-1].usage


def request(
    prompt: tuple[int, ...] | list[int] | str = GOOD_PROMPT, adapter: str = "", **sampling: object
) -> pb.GenerateRequest:
    message = pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), adapter=adapter)
    if isinstance(prompt, str):
        message.text = prompt
    else:
        message.token_ids.CopyFrom(pb.TokenIds(ids=list(prompt)))
    return message


def greedy(
    prompt: tuple[int, ...] | list[int] | str = GOOD_PROMPT, max_tokens: int = 8, **sampling: object
) -> pb.GenerateRequest:
    sampling = {"temperature": 0.0, "ignore_eos": True, **sampling}
    return request(prompt, max_tokens=max_tokens, **sampling)


def long_request() -> pb.GenerateRequest:
    """Runs for seconds on the tiny model: only cancellation or a deadline ends it in a test."""
    return greedy((1, 2, 3, 4), max_tokens=LONG_MAX_TOKENS)


def generate(stub: pb_grpc.GenerationStub, message: pb.GenerateRequest) -> Generation:
    responses = list(stub.Generate(message, timeout=RPC_TIMEOUT_SECONDS))
    assert responses, "a finished stream has at least its last message"
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    assert responses[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return Generation(
        token_ids=[t for r in responses for t in r.token_ids],
        text="".join(r.text for r in responses),
        logprobs=[p for r in responses for p in r.logprobs],
        responses=responses,
    )


def generate_error(stub: pb_grpc.GenerationStub, message: pb.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(message, timeout=RPC_TIMEOUT_SECONDS))
    return caught.value


def wait_idle(stub: pb_grpc.GenerationStub, timeout: float = 5.0) -> pb.ServerInfo:
    """The server info once no request runs or waits and every device block is free."""
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=RPC_TIMEOUT_SECONDS)
        idle = (info.num_running, info.num_waiting) == (0, 0) and (
            info.num_free_device_blocks == info.num_device_blocks
        )
        if idle or time.monotonic() > deadline:
            assert idle, f"not idle {timeout} s after the last request ended:\n{info}"
            return info
        time.sleep(0.05)


def wait_info(
    stub: pb_grpc.GenerationStub, predicate: Callable[[pb.ServerInfo], bool], timeout: float = 5.0
) -> pb.ServerInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=RPC_TIMEOUT_SECONDS)
        if predicate(info) or time.monotonic() > deadline:
            assert predicate(info), f"server info never matched within {timeout} s:\n{info}"
            return info
        time.sleep(0.05)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained_dir(model_dir)


@pytest.fixture(scope="module")
def address(model_dir: Path) -> Iterator[str]:
    with running_server(model_dir, scheduler_args=("--max-model-len", str(MAX_MODEL_LEN))) as server_address:
        yield server_address


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.GenerationStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def good_tokens(stub: pb_grpc.GenerationStub) -> list[int]:
    """The greedy answer to the good request, taken before any bad request reached the server."""
    generation = generate(stub, greedy())
    assert generation.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(generation.token_ids) == 8
    return generation.token_ids


@pytest.fixture(scope="module")
def queue_stub(model_dir: Path) -> Iterator[pb_grpc.GenerationStub]:
    """A second server that runs one sequence at a time and queues at most one more."""
    scheduler_args = ("--max-queued-requests", "1", "--max-num-seqs", "1", "--max-num-batched-tokens", "64")
    with running_server(model_dir, scheduler_args=scheduler_args) as server_address:
        with grpc.insecure_channel(server_address) as channel:
            yield pb_grpc.GenerationStub(channel)


def assert_serves(stub: pb_grpc.GenerationStub, good_tokens: list[int]) -> None:
    generation = generate(stub, greedy())
    assert generation.finish_reason == pb.FINISH_REASON_LENGTH
    assert generation.token_ids == good_tokens


PROMPT_100 = tuple(range(10, 110))
PROMPT_MAX = tuple(range(MAX_MODEL_LEN))

INVALID_REQUESTS = [
    pytest.param(pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=4)), "prompt is empty",
                 id="no-input"),
    pytest.param(request("", max_tokens=4), "prompt is empty", id="empty-text"),
    pytest.param(request((), max_tokens=4), "prompt is empty", id="empty-token-ids"),
    pytest.param(request((1, VOCAB_SIZE, 2)), f"[{VOCAB_SIZE}] are outside the vocabulary [0, {VOCAB_SIZE})",
                 id="token-id-past-vocab"),
    pytest.param(request((1, -1)), f"[-1] are outside the vocabulary [0, {VOCAB_SIZE})",
                 id="negative-token-id"),
    pytest.param(request(PROMPT_100, max_tokens=29), "lower max_tokens to at most 28",
                 id="prompt+max_tokens>len"),
    pytest.param(request(PROMPT_MAX), "shorten the prompt", id="prompt=max_model_len"),
    pytest.param(request(temperature=math.nan), "temperature", id="temperature-nan"),
    pytest.param(request(temperature=math.inf), "temperature", id="temperature-inf"),
    pytest.param(request(temperature=-0.5), "temperature", id="temperature-negative"),
    pytest.param(request(top_p=0.0), "top_p", id="top_p-0"),
    pytest.param(request(top_p=1.5), "top_p", id="top_p-1.5"),
    pytest.param(request(top_k=-2), "top_k", id="top_k--2"),
    pytest.param(request(min_p=-0.1), "min_p", id="min_p--0.1"),
    pytest.param(request(min_p=1.5), "min_p", id="min_p-1.5"),
    pytest.param(request(repetition_penalty=0.0), "repetition_penalty", id="repetition_penalty-0"),
    pytest.param(request(presence_penalty=3.0), "presence_penalty", id="presence_penalty-3"),
    pytest.param(request(frequency_penalty=3.0), "frequency_penalty", id="frequency_penalty-3"),
    pytest.param(request(logprobs=MAX_LOGPROBS + 1), f"logprobs must be between 0 and {MAX_LOGPROBS}",
                 id="logprobs-over-max"),
    pytest.param(request(max_tokens=0), "max_tokens must be >= 1", id="max_tokens-0"),
    pytest.param(request(max_tokens=4, min_tokens=5), "min_tokens (5) must not exceed max_tokens (4)",
                 id="min_tokens>max_tokens"),
    pytest.param(request(stop_token_ids=[VOCAB_SIZE]), "stop_token_ids", id="stop_token_id-past-vocab"),
    pytest.param(request(stop_token_ids=[-1]), "stop_token_ids", id="stop_token_id-negative"),
    pytest.param(request(stop=["ok", ""]), "stop strings must not be empty", id="empty-stop-string"),
]


@pytest.mark.parametrize(("message", "keyword"), INVALID_REQUESTS)
def test_invalid_request_is_invalid_argument_and_server_keeps_serving(
    stub: pb_grpc.GenerationStub, good_tokens: list[int], message: pb.GenerateRequest, keyword: str
) -> None:
    error = generate_error(stub, message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert keyword in error.details()
    assert_serves(stub, good_tokens)


def test_requests_at_the_limits_are_accepted(stub: pb_grpc.GenerationStub, tokenizer: Tokenizer) -> None:
    filled = generate(stub, greedy(PROMPT_100, max_tokens=MAX_MODEL_LEN - len(PROMPT_100)))
    assert filled.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(filled.token_ids) == MAX_MODEL_LEN - len(PROMPT_100)
    one_short = generate(stub, request(PROMPT_MAX[:-1], temperature=0.0, ignore_eos=True))
    assert one_short.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(one_short.token_ids) == 1
    scored = generate(stub, greedy(max_tokens=5, logprobs=MAX_LOGPROBS))
    assert len(scored.logprobs) == len(scored.token_ids) == 5
    assert all(-math.inf < p <= 0.0 for p in scored.logprobs)
    wait_idle(stub)


def test_unknown_adapter_is_not_found(stub: pb_grpc.GenerationStub, good_tokens: list[int]) -> None:
    error = generate_error(stub, request(adapter="nope", max_tokens=4))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert "'nope'" in error.details() and "adapter" in error.details()
    assert_serves(stub, good_tokens)


def test_full_queue_is_resource_exhausted(queue_stub: pb_grpc.GenerationStub) -> None:
    good_tokens = generate(queue_stub, greedy()).token_ids
    running = queue_stub.Generate(long_request(), timeout=RPC_TIMEOUT_SECONDS)
    waiting = None
    try:
        # Running first: sent back to back, the second could find the first still queued (and be refused).
        assert next(running).token_ids
        waiting = queue_stub.Generate(long_request(), timeout=RPC_TIMEOUT_SECONDS)
        wait_info(queue_stub, lambda info: (info.num_running, info.num_waiting) == (1, 1))
        error = generate_error(queue_stub, greedy())
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queued-requests 1" in error.details()
    finally:
        if waiting is not None:
            waiting.cancel()
        running.cancel()
    wait_idle(queue_stub)
    assert_serves(queue_stub, good_tokens)


def test_cancelling_a_stream_mid_way_frees_its_blocks(queue_stub: pb_grpc.GenerationStub) -> None:
    good_tokens = generate(queue_stub, greedy()).token_ids
    call = queue_stub.Generate(long_request(), timeout=RPC_TIMEOUT_SECONDS)
    received = [next(call) for _ in range(3)]
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED and r.token_ids for r in received)
    busy = queue_stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=RPC_TIMEOUT_SECONDS)
    assert busy.num_running == 1
    assert busy.num_free_device_blocks < busy.num_device_blocks
    call.cancel()
    assert call.code() == grpc.StatusCode.CANCELLED
    wait_idle(queue_stub)
    assert_serves(queue_stub, good_tokens)


def test_passed_deadline_aborts_the_request(queue_stub: pb_grpc.GenerationStub) -> None:
    good_tokens = generate(queue_stub, greedy()).token_ids
    num_tokens = 0
    with pytest.raises(grpc.RpcError) as caught:
        for response in queue_stub.Generate(long_request(), timeout=1.0):
            num_tokens += len(response.token_ids)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0 < num_tokens < LONG_MAX_TOKENS
    wait_idle(queue_stub)
    assert_serves(queue_stub, good_tokens)


STOP_PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def reference(stub: pb_grpc.GenerationStub) -> Generation:
    """Greedy output of STOP_PROMPT with no stop rule but the length."""
    generation = generate(stub, greedy(STOP_PROMPT, max_tokens=60))
    assert generation.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(generation.token_ids) == 60
    return generation


def test_max_tokens_ends_with_length(stub: pb_grpc.GenerationStub, reference: Generation) -> None:
    generation = generate(stub, greedy(STOP_PROMPT, max_tokens=7))
    assert generation.finish_reason == pb.FINISH_REASON_LENGTH
    assert generation.token_ids == reference.token_ids[:7]
    assert generation.usage.completion_tokens == 7
    assert generation.usage.prompt_tokens == len(STOP_PROMPT) + 1


def test_stop_token_id_ends_with_stop_and_is_the_last_token(
    stub: pb_grpc.GenerationStub, reference: Generation, tokenizer: Tokenizer
) -> None:
    ids = reference.token_ids
    index = next(i for i in range(3, len(ids)) if ids[i] not in ids[:i] and ids[i] < 256)
    generation = generate(stub, greedy(STOP_PROMPT, max_tokens=60, stop_token_ids=[ids[index]]))
    assert generation.finish_reason == pb.FINISH_REASON_STOP
    assert generation.token_ids == ids[: index + 1]
    assert generation.usage.completion_tokens == index + 1
    # vLLM's rule: a stop token's id is returned, its text is not.
    assert generation.text == tokenizer.decode(ids[:index])


def test_stop_string_cuts_the_text_before_its_first_occurrence(
    stub: pb_grpc.GenerationStub, reference: Generation, tokenizer: Tokenizer
) -> None:
    text = reference.text
    start = next(
        i for i in range(len(text) // 2, len(text) - 1)
        if all(c.isprintable() and c != "\ufffd" for c in text[i : i + 2])
    )
    stop = text[start : start + 2]
    generation = generate(stub, greedy(STOP_PROMPT, max_tokens=60, stop=[stop]))
    assert generation.finish_reason == pb.FINISH_REASON_STOP
    assert generation.text == text[: text.index(stop)]
    assert generation.token_ids == reference.token_ids[: len(generation.token_ids)]
    assert tokenizer.decode(generation.token_ids).startswith(generation.text + stop)


def test_min_tokens_holds_back_a_stop_token(stub: pb_grpc.GenerationStub, reference: Generation) -> None:
    first = reference.token_ids[0]
    unguarded = generate(stub, greedy(STOP_PROMPT, max_tokens=60, stop_token_ids=[first]))
    assert unguarded.token_ids == [first]
    assert unguarded.finish_reason == pb.FINISH_REASON_STOP
    generation = generate(stub, greedy(STOP_PROMPT, max_tokens=60, stop_token_ids=[first], min_tokens=3))
    ids = generation.token_ids
    assert len(ids) >= 3
    assert first not in ids[:-1]
    assert (generation.finish_reason == pb.FINISH_REASON_STOP) == (ids[-1] == first)
    if generation.finish_reason == pb.FINISH_REASON_LENGTH:
        assert len(ids) == 60


@pytest.mark.parametrize(
    "prompt",
    [
        pytest.param("The quick brown fox", id="ascii"),
        pytest.param("héllo wörld — 日本語 🙂", id="non-ascii"),
    ],
)
def test_streamed_text_is_the_decoded_token_ids(
    stub: pb_grpc.GenerationStub, tokenizer: Tokenizer, prompt: str
) -> None:
    prompt_ids = tokenizer.encode(prompt)
    max_tokens = MAX_MODEL_LEN - len(prompt_ids)
    sampled = request(prompt, temperature=1.0, seed=5, max_tokens=max_tokens, ignore_eos=True)
    generation = generate(stub, sampled)
    assert generation.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(generation.token_ids) == max_tokens
    assert len(generation.responses) > 1
    assert generation.usage.prompt_tokens == len(prompt_ids)
    assert generation.text == tokenizer.decode(generation.token_ids)


def test_seeded_sampling_does_not_depend_on_the_batch(stub: pb_grpc.GenerationStub) -> None:
    seeded = request(tuple(range(40, 60)), temperature=0.8, seed=1234, max_tokens=48, ignore_eos=True)
    alone = generate(stub, seeded).token_ids
    other_seed = request(tuple(range(40, 60)), temperature=0.8, seed=4321, max_tokens=48, ignore_eos=True)
    assert generate(stub, other_seed).token_ids != alone
    rng = random.Random(0)
    others = [
        request([rng.randrange(256) for _ in range(rng.randrange(5, 60))], temperature=1.0,
                max_tokens=rng.randrange(30, 60), ignore_eos=True)
        for _ in range(6)
    ]
    with ThreadPoolExecutor(len(others) + 1) as pool:
        futures = [pool.submit(generate, stub, message) for message in others]
        together = pool.submit(generate, stub, seeded).result()
        for future in futures:
            assert future.result().finish_reason == pb.FINISH_REASON_LENGTH
    assert together.token_ids == alone
    wait_idle(stub)


def test_health_and_reflection(address: str) -> None:
    assert health_status(address, "") == health_pb2.HealthCheckResponse.SERVING
    assert health_status(address, "pagewire.v1.Generation") == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=RPC_TIMEOUT_SECONDS
        )
        names = {service.name for r in responses for service in r.list_services_response.service}
    assert {"pagewire.v1.Generation", "grpc.health.v1.Health"} <= names
