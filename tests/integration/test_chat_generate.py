"""Chat over the public Generate API (`messages`, rendered by the server) and the gRPC API key, real processes.

The references are transformers: its `apply_chat_template` gives the prompt ids, its `generate` the greedy
continuation of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from transformers import AutoModelForCausalLM, AutoTokenizer

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import health_status, running_server

API_KEY = "secret"
GOOD_KEY = (("authorization", f"Bearer {API_KEY}"),)
NUM_NEW_TOKENS = 24
RPC_TIMEOUT_SECONDS = 60.0
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 🗾 東京?"},
]
# Mistral v0.1's rule, so a conversation that breaks it makes the model's own template fail.
ALTERNATING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endfor %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def address(model_dir: Path) -> Iterator[str]:
    with running_server(model_dir, scheduler_args=("--api-key", API_KEY)) as server_address:
        yield server_address


@pytest.fixture(scope="module")
def stub(address: str) -> Iterator[pb_grpc.GenerationStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.GenerationStub(channel)


def chat(messages: list[dict[str, str]]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages])


def greedy(**prompt: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True), **prompt
    )


Metadata = tuple[tuple[str, str], ...]


def generate(
    stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, metadata: Metadata = GOOD_KEY
) -> tuple[list[int], pb.Usage]:
    responses = list(stub.Generate(request, timeout=RPC_TIMEOUT_SECONDS, metadata=metadata))
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    return [t for r in responses for t in r.token_ids], responses[-1].usage


def generate_error(
    stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, metadata: Metadata = GOOD_KEY
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        list(stub.Generate(request, timeout=RPC_TIMEOUT_SECONDS, metadata=metadata))
    return raised.value


def test_messages_prompt_is_transformers_chat_template(model_dir: Path, stub: pb_grpc.GenerationStub) -> None:
    hf_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat_ids = list(hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True)[
        "input_ids"
    ])
    rendered = hf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    expected = model.generate(
        torch.tensor([chat_ids]), attention_mask=torch.ones(1, len(chat_ids), dtype=torch.long),
        max_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=0,
    )[0, len(chat_ids):].tolist()

    from_messages, usage = generate(stub, greedy(messages=chat(CONVERSATION)))
    assert usage.prompt_tokens == len(chat_ids)
    assert from_messages == expected
    from_ids, ids_usage = generate(stub, greedy(token_ids=pb.TokenIds(ids=chat_ids)))
    assert (from_ids, ids_usage.prompt_tokens) == (expected, len(chat_ids))
    # The same rendering sent as `text` is encoded as HF's tokenizer(text): with the BOS it adds on top of
    # the template's own, which is why the server tokenizes rendered chats without special tokens.
    _, text_usage = generate(stub, greedy(text=rendered))
    assert text_usage.prompt_tokens == len(hf_tokenizer(rendered)["input_ids"]) == len(chat_ids) + 1


@pytest.mark.parametrize(
    ("messages", "keyword"),
    [
        pytest.param([], "`messages` is empty", id="empty-messages"),
        pytest.param([{"role": "user", "content": "hi"}, {"role": "", "content": "x"}],
                     "messages[1] has an empty role", id="empty-role"),
    ],
)
def test_bad_messages_are_invalid_argument(
    stub: pb_grpc.GenerationStub, messages: list[dict[str, str]], keyword: str
) -> None:
    error = generate_error(stub, greedy(messages=chat(messages)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert keyword in error.details()


def test_a_template_error_is_invalid_argument_with_its_message(
    tmp_path_factory: pytest.TempPathFactory
) -> None:
    strict_dir = create_tiny_model(tmp_path_factory.mktemp("strict"), seed=5)
    config_path = strict_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = ALTERNATING_TEMPLATE
    config_path.write_text(json.dumps(config))
    with running_server(strict_dir) as strict_address, grpc.insecure_channel(strict_address) as channel:
        strict = pb_grpc.GenerationStub(channel)
        bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        error = generate_error(strict, greedy(messages=chat(bad)), metadata=())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
        assert "Conversation roles must alternate user/assistant/user/assistant/..." in error.details()
        good = [{"role": "user", "content": "a"}]
        tokens, usage = generate(strict, greedy(messages=chat(good)), metadata=())
        hf_tokenizer = AutoTokenizer.from_pretrained(strict_dir)
        hf_ids = hf_tokenizer.apply_chat_template(good, add_generation_prompt=True)["input_ids"]
        assert usage.prompt_tokens == len(hf_ids) == 1 + len("[INST] a [/INST]")
        assert len(tokens) == NUM_NEW_TOKENS


@pytest.mark.parametrize(
    ("metadata", "keyword"),
    [
        pytest.param((), "missing API key", id="no-key"),
        pytest.param((("authorization", "Bearer wrong"),), "invalid API key", id="wrong-key"),
        pytest.param((("authorization", API_KEY),), "not a Bearer token", id="no-scheme"),
    ],
)
def test_generation_needs_the_api_key(
    stub: pb_grpc.GenerationStub, metadata: Metadata, keyword: str
) -> None:
    error = generate_error(stub, greedy(text="hello"), metadata=metadata)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error.details()
    assert keyword in error.details() and "authorization: Bearer <key>" in error.details()
    with pytest.raises(grpc.RpcError) as raised:
        stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=RPC_TIMEOUT_SECONDS, metadata=metadata)
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_right_key_works_and_health_stays_open(address: str, stub: pb_grpc.GenerationStub) -> None:
    tokens, _ = generate(stub, greedy(text="hello"), metadata=(("authorization", f"bearer {API_KEY}"),))
    assert len(tokens) == NUM_NEW_TOKENS
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=RPC_TIMEOUT_SECONDS, metadata=GOOD_KEY)
    assert info.executor_ready
    assert health_status(address, "pagewire.v1.Generation") == health_pb2.HealthCheckResponse.SERVING
    assert health_status(address, "") == health_pb2.HealthCheckResponse.SERVING
