"""The OpenAI-compatible HTTP API against a real scheduler + executor process pair, through the official `openai` client."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import free_port, running_server

API_KEY = "sekret"
MESSAGES = [{"role": "user", "content": "Tell me about paged attention."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(Path(tmp_path_factory.mktemp("tiny")), seed=3)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[tuple[str, str]]:
    """(gRPC address, HTTP base URL) of a scheduler with its HTTP API on a free port."""
    port = free_port()
    with running_server(model_dir, scheduler_args=("--http-port", str(port))) as address:
        yield address, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def client(server: tuple[str, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _server_info(address: str) -> pb.ServerInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)


def _wait_all_blocks_free(address: str, timeout: float = 20.0) -> pb.ServerInfo:
    deadline = time.monotonic() + timeout
    while True:
        info = _server_info(address)
        if info.num_free_device_blocks == info.num_device_blocks and info.num_running == 0 and info.num_waiting == 0:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still held: {info}")
        time.sleep(0.1)


def test_models_health_and_version(server: tuple[str, str], model_dir: Path) -> None:
    status, body = _get(server[1] + "/v1/models")
    assert status == 200
    models = json.loads(body)
    assert [m["id"] for m in models["data"]] == [model_dir.name]
    assert _get(server[1] + "/health")[0] == 200
    status, body = _get(server[1] + "/version")
    assert status == 200 and "version" in json.loads(body)


def test_chat_streaming_text_equals_the_non_streaming_greedy_text(client: openai.OpenAI, model: str) -> None:
    whole = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    chunks = list(client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 12
    assert last.usage.prompt_tokens == whole.usage.prompt_tokens
    # The same prompt again: its full blocks come from the prefix cache.
    assert last.usage.prompt_tokens_details.cached_tokens > 0


def test_completions_streaming_and_n(client: openai.OpenAI, model: str) -> None:
    whole = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
    text = whole.choices[0].text
    assert whole.usage.completion_tokens == 10
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == text
    two = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.text for c in two.choices] == [text, text]
    assert two.usage.completion_tokens == 20 and two.usage.prompt_tokens == whole.usage.prompt_tokens
    default = client.completions.create(
        model=model, prompt="Once upon a time", temperature=0, extra_body={"ignore_eos": True}
    )
    assert default.usage.completion_tokens == 16  # vLLM's (and OpenAI's) completions default


def test_logprobs_shapes(client: openai.OpenAI, model: str) -> None:
    completion = client.completions.create(model=model, prompt="abc", max_tokens=4, temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert value <= 0 and 1 <= len(top) <= 3  # top 2 plus the chosen one
        # Greedy: the chosen token is the likeliest. (Keys are token texts, so byte tokens that decode to the
        # same U+FFFD share one key, as in OpenAI's legacy format.)
        assert max(top.values()) == value and token in top
    chat = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == item.logprob
        assert item.bytes == list(item.token.encode())


def test_stop_string(client: openai.OpenAI, model: str) -> None:
    text = client.completions.create(model=model, prompt="xyz", max_tokens=16, temperature=0).choices[0].text
    stop = text[5]
    stopped = client.completions.create(model=model, prompt="xyz", max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_bad_parameter_and_unknown_model(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError, match=r"temperature must be a finite number >= 0 \(0 = greedy\), got -1.0"):
        client.completions.create(model=model, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="top_p must be in"):
        client.chat.completions.create(model=model, messages=MESSAGES, top_p=0)
    with pytest.raises(openai.BadRequestError, match="n: Input should be greater than or equal to 1"):
        client.completions.create(model=model, prompt="x", n=0)
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4` does not exist."):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES)


def test_metrics_after_requests(server: tuple[str, str], client: openai.OpenAI, model: str) -> None:
    client.completions.create(model=model, prompt="metrics please", max_tokens=3, temperature=0)
    status, body = _get(server[1] + "/metrics")
    assert status == 200
    samples: dict[str, float] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            if f'model_name="{model}"' in name_labels:
                name = name_labels.split("{")[0]
                if "finished_reason=" in name_labels:
                    name += "{" + name_labels.split("finished_reason=")[1].split('"')[1] + "}"
                samples[name] = samples.get(name, 0.0) + float(value)
    for name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total{length}",
                 "vllm:prefix_cache_queries_total", "vllm:time_to_first_token_seconds_count",
                 "vllm:inter_token_latency_seconds_count", "vllm:e2e_request_latency_seconds_count",
                 "vllm:request_queue_time_seconds_count", "vllm:request_prompt_tokens_count",
                 "vllm:request_generation_tokens_count", "pagewire:step_duration_seconds_count",
                 "pagewire:plan_bytes_total"):
        assert samples.get(name, 0) > 0, name
    # gRPC requests run through the same engine, so they count too.
    with grpc.insecure_channel(server[0]) as channel:
        request = pb.GenerateRequest(text="over grpc", sampling=pb.SamplingParams(max_tokens=2, ignore_eos=True))
        list(pb_grpc.GenerationStub(channel).Generate(request, timeout=30))
    after = _get(server[1] + "/metrics")[1].decode()
    total = samples["vllm:generation_tokens_total"] + 2
    assert f'vllm:generation_tokens_total{{engine="0",model_name="{model}"}} {total:.1f}' in after
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total", "pagewire:num_preemptions_total",
                 "pagewire:num_blocks_swapped_out_total", "pagewire:num_tokens_recomputed_total",
                 "pagewire:executor_idle_seconds_total"):
        assert name in samples, name


def test_client_disconnect_mid_stream_frees_every_block(
    server: tuple[str, str], client: openai.OpenAI, model: str
) -> None:
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=1000, temperature=0, stream=True,
        extra_body={"ignore_eos": True},
    )
    for _, chunk in zip(range(3), stream):
        pass
    assert _server_info(server[0]).num_running == 1
    stream.close()
    _wait_all_blocks_free(server[0])


def test_client_disconnect_while_waiting_for_a_whole_response_frees_every_block(server: tuple[str, str], model: str) -> None:
    body = json.dumps({"model": model, "prompt": "long", "max_tokens": 1000, "ignore_eos": True}).encode()
    request = urllib.request.Request(server[1] + "/v1/completions", body, {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(request, timeout=0.5)
    _wait_all_blocks_free(server[0])


def test_api_key(model_dir: Path) -> None:
    port = free_port()
    with running_server(model_dir, scheduler_args=("--http-port", str(port), "--api-key", API_KEY)):
        base = f"http://127.0.0.1:{port}"
        bad = openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError, match="invalid API key"):
            bad.chat.completions.create(model="any", messages=MESSAGES)
        status, body = _get(base + "/v1/models")  # no Authorization header at all
        assert status == 401
        assert json.loads(body)["error"]["type"] == "AuthenticationError"
        assert "missing API key" in json.loads(body)["error"]["message"]
        good = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
        model = good.models.list().data[0].id
        reply = good.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens == 2
        assert _get(base + "/health")[0] == 200 and _get(base + "/metrics")[0] == 200
