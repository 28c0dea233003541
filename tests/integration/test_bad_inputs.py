"""Hostile and clumsy inputs on the public APIs (issue 14): each gets its documented code and a message
naming what to change, and the same server then serves a normal request exactly as before.

Real executor and scheduler processes on loopback, the tiny model (vocabulary 260, byte-level), max_model_len
128, so a text prompt over 128 * 64 = 8192 UTF-8 bytes is refused before tokenizing.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from executor_service.tiny_model import create_tiny_model
from scheduler_service.tokenizer import Tokenizer
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from shared.request_limits import (
    MAX_CACHE_SALT_CHARS,
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MIN_PROMPT_BYTES_PER_TOKEN,
)
from tests.helpers.processes import free_port, running_server

MAX_MODEL_LEN = 128
TEXT_BYTE_LIMIT = MAX_MODEL_LEN * MIN_PROMPT_BYTES_PER_TOKEN
RPC_TIMEOUT_SECONDS = 30.0
GOOD_PROMPT = (72, 101, 108, 108, 111)
GENERATE = "/pagewire.v1.Generation/Generate"


def greedy(**fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=list(GOOD_PROMPT)),
        sampling=pb.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8),
        **fields,
    )


def with_sampling(**sampling: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(GOOD_PROMPT)), sampling=pb.SamplingParams(**sampling))


GOOD_BYTES = greedy().SerializeToString()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[tuple[grpc.Channel, str]]:
    """A gRPC channel to the scheduler and its HTTP base URL."""
    http_port = free_port()
    args = ("--max-model-len", str(MAX_MODEL_LEN), "--http-port", str(http_port))
    with running_server(model_dir, scheduler_args=args) as address:
        with grpc.insecure_channel(address) as channel:
            yield channel, f"http://127.0.0.1:{http_port}"


@pytest.fixture(scope="module")
def good_tokens(server: tuple[grpc.Channel, str]) -> list[int]:
    """The greedy answer to the normal request, taken before any bad input reached the server."""
    return generated_tokens(server[0])


def generated_tokens(channel: grpc.Channel) -> list[int]:
    responses = list(pb_grpc.GenerationStub(channel).Generate(greedy(), timeout=RPC_TIMEOUT_SECONDS))
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    tokens = [t for r in responses for t in r.token_ids]
    assert len(tokens) == 8
    return tokens


def test_the_tiny_vocabulary_needs_no_more_than_the_minimum_bytes_per_token(model_dir: Path) -> None:
    tokenizer = Tokenizer.from_pretrained_dir(model_dir)
    entries = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    assert max(len(e.encode("utf-8")) for e in entries if e is not None) <= MIN_PROMPT_BYTES_PER_TOKEN


def raw(*fields: tuple[int, bytes]) -> bytes:
    """A GenerateRequest's wire bytes with length-delimited `fields` (number, payload) added to it."""
    extra = b"".join(bytes([number << 3 | 2, len(payload)]) + payload for number, payload in fields)
    return GOOD_BYTES + extra


def chat(content: str) -> pb.GenerateRequest:
    messages = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=content)])
    return pb.GenerateRequest(messages=messages, sampling=pb.SamplingParams(max_tokens=4))


GRPC_CASES = [
    pytest.param(b"\xff\xff\xff\xff\xff", "could not be decoded", id="garbage-bytes"),
    pytest.param(b"\x0a\x05ab", "could not be decoded", id="truncated-message"),
    pytest.param(raw((2, b"\xff\xfe")), "could not be decoded", id="text-invalid-utf8"),
    pytest.param(raw((1, b"id\xc3")), "could not be decoded", id="request_id-invalid-utf8"),
    pytest.param(pb.GenerateRequest(text="a" * (TEXT_BYTE_LIMIT + 1)),
                 f"{TEXT_BYTE_LIMIT + 1} UTF-8 bytes, more than {TEXT_BYTE_LIMIT} bytes", id="text-too-long"),
    pytest.param(pb.GenerateRequest(text="é" * (TEXT_BYTE_LIMIT // 2 + 1)),
                 f"{TEXT_BYTE_LIMIT + 2} UTF-8 bytes", id="text-too-long-in-bytes-not-chars"),
    pytest.param(chat("b" * (TEXT_BYTE_LIMIT + 1)), f"more than {TEXT_BYTE_LIMIT} bytes", id="messages-too-long"),
    pytest.param(greedy(request_id="r" * (MAX_REQUEST_ID_CHARS + 1)),
                 f"request_id has {MAX_REQUEST_ID_CHARS + 1} characters; send at most {MAX_REQUEST_ID_CHARS}",
                 id="request_id-too-long"),
    pytest.param(greedy(cache_salt="s" * (MAX_CACHE_SALT_CHARS + 1)),
                 f"cache_salt has {MAX_CACHE_SALT_CHARS + 1} characters; send at most {MAX_CACHE_SALT_CHARS}",
                 id="cache_salt-too-long"),
    pytest.param(with_sampling(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]),
                 f"{MAX_STOP_STRINGS + 1} stop strings given; send at most {MAX_STOP_STRINGS}",
                 id="too-many-stop-strings"),
    pytest.param(with_sampling(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]),
                 f"a stop string has {MAX_STOP_STRING_CHARS + 1} characters; each may have at most "
                 f"{MAX_STOP_STRING_CHARS}", id="stop-string-too-long"),
    pytest.param(pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(MAX_MODEL_LEN))),
                                    sampling=pb.SamplingParams(max_tokens=4)),
                 f"the prompt has {MAX_MODEL_LEN} tokens, which leaves no room for output under max_model_len "
                 f"({MAX_MODEL_LEN})", id="prompt-fills-max_model_len-with-max_tokens"),
    pytest.param(with_sampling(min_tokens=MAX_MODEL_LEN + 1),
                 f"min_tokens ({MAX_MODEL_LEN + 1}) cannot be reached: the prompt ({len(GOOD_PROMPT)} tokens) "
                 f"leaves room for {MAX_MODEL_LEN - len(GOOD_PROMPT)} output tokens", id="min_tokens>max_model_len"),
]


@pytest.mark.parametrize(("message", "expected"), GRPC_CASES)
def test_bad_grpc_input_is_invalid_argument_and_the_server_keeps_serving(
    server: tuple[grpc.Channel, str], good_tokens: list[int], message: bytes | pb.GenerateRequest, expected: str
) -> None:
    channel = server[0]
    payload = message if isinstance(message, bytes) else message.SerializeToString()
    call = channel.unary_stream(
        GENERATE, request_serializer=None, response_deserializer=pb.GenerateResponse.FromString
    )
    with pytest.raises(grpc.RpcError) as caught:
        list(call(payload, timeout=RPC_TIMEOUT_SECONDS))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert expected in error.details()
    assert "at most 0" not in error.details()
    assert generated_tokens(channel) == good_tokens


def test_limits_themselves_are_accepted(server: tuple[grpc.Channel, str], good_tokens: list[int]) -> None:
    channel = server[0]
    stub = pb_grpc.GenerationStub(channel)
    request = greedy(request_id="r" * MAX_REQUEST_ID_CHARS, cache_salt="s" * MAX_CACHE_SALT_CHARS)
    stops = ["#" * MAX_STOP_STRING_CHARS] + [f"#stop{i:02d}#" for i in range(MAX_STOP_STRINGS - 1)]
    request.sampling.stop.extend(stops)
    request.sampling.min_tokens = 8
    responses = list(stub.Generate(request, timeout=RPC_TIMEOUT_SECONDS))
    assert [t for r in responses for t in r.token_ids] == good_tokens
    assert {r.request_id for r in responses} == {"r" * MAX_REQUEST_ID_CHARS}


def post(base_url: str, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        base_url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_SECONDS) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


HTTP_CASES = [
    pytest.param("/v1/completions", {"prompt": "a" * (TEXT_BYTE_LIMIT + 1), "max_tokens": 4},
                 f"more than {TEXT_BYTE_LIMIT} bytes", id="completion-text-too-long"),
    pytest.param("/v1/completions", {"prompt": ["ok", "a" * (TEXT_BYTE_LIMIT + 1)], "max_tokens": 4},
                 f"more than {TEXT_BYTE_LIMIT} bytes", id="second-completion-prompt-too-long"),
    pytest.param("/v1/chat/completions",
                 {"messages": [{"role": "user", "content": "b" * (TEXT_BYTE_LIMIT + 1)}], "max_tokens": 4},
                 f"more than {TEXT_BYTE_LIMIT} bytes", id="chat-too-long"),
    pytest.param("/v1/completions",
                 {"prompt": "hi", "max_tokens": 4, "stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]},
                 f"each may have at most {MAX_STOP_STRING_CHARS}", id="completion-stop-too-long"),
]


@pytest.mark.parametrize(("path", "body", "expected"), HTTP_CASES)
def test_bad_http_input_is_400_and_the_server_keeps_serving(
    server: tuple[grpc.Channel, str], good_tokens: list[int], path: str, body: dict[str, object], expected: str
) -> None:
    status, answer = post(server[1], path, body)
    assert status == 400, answer
    error = answer["error"]
    assert isinstance(error, dict) and expected in str(error["message"]), answer
    assert generated_tokens(server[0]) == good_tokens
