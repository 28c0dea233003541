"""Serving SmolLM2's GGUF file directly: concurrent greedy chat requests (`messages`, rendered by the
scheduler's chat template) equal transformers on that file, rendered by its `apply_chat_template`."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pagewire.default_model import default_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import running_server

NUM_NEW_TOKENS = 24
Conversation = list[dict[str, str]]


def _ask(question: str) -> Conversation:
    return [{"role": "user", "content": question}]


CONVERSATIONS: list[Conversation] = [
    _ask("Hi!"),
    _ask("What is 2 + 2?"),
    _ask("Write a short haiku about the sea at night, please."),
    [
        {"role": "system", "content": "You answer like a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
        {"role": "assistant", "content": "Arr, buried under the old palm tree!"},
        {"role": "user", "content": "Which tree, exactly? Be über-précis, s'il vous plaît!"},
    ],
    _ask("Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name."),
    _ask(
        "List three fruits, three vegetables and three grains, each with one short sentence about how it is "
        "usually eaten, as a numbered list in plain text without any markdown formatting at all please."
    ),
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_model()


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def reference_model(gguf_path: Path) -> PreTrainedModel:
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def address(gguf_path: Path) -> Iterator[str]:
    # Small token budget so the longer prompts are prefilled in chunks beside the others' decodes.
    scheduler_args = ("--max-num-batched-tokens", "64", "--max-num-seqs", "8", "--max-model-len", "1024")
    with running_server(gguf_path, scheduler_args=scheduler_args) as server_address:
        yield server_address


def chat_text(tokenizer: PreTrainedTokenizerBase, conversation: Conversation) -> str:
    return tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)


def chat_request(conversation: Conversation) -> pb.GenerateRequest:
    turns = [pb.ChatMessage(role=turn["role"], content=turn["content"]) for turn in conversation]
    return pb.GenerateRequest(messages=pb.ChatMessages(messages=turns))


def generate(
    stub: pb_grpc.GenerationStub, request: pb.GenerateRequest, ignore_eos: bool
) -> list[pb.GenerateResponse]:
    request.sampling.CopyFrom(
        pb.SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=ignore_eos)
    )
    return list(stub.Generate(request, timeout=300))


def test_concurrent_chat_prompts_match_transformers_token_for_token(
    address: str, reference_tokenizer: PreTrainedTokenizerBase, reference_model: PreTrainedModel
) -> None:
    # apply_chat_template(tokenize=True) tokenizes the rendered text without adding special tokens.
    texts = [chat_text(reference_tokenizer, conversation) for conversation in CONVERSATIONS]
    prompts = [reference_tokenizer(text, add_special_tokens=False).input_ids for text in texts]
    assert len({len(prompt) for prompt in prompts}) == len(prompts) and max(map(len, prompts)) > 64
    requests = [chat_request(conversation) for conversation in CONVERSATIONS]
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with ThreadPoolExecutor(len(requests)) as pool:
            results = list(pool.map(lambda request: generate(stub, request, ignore_eos=True), requests))
    reference_model.generation_config.eos_token_id = None
    for index, (prompt, responses) in enumerate(zip(prompts, results, strict=True)):
        expected = reference_model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=2,
        )[0, len(prompt):].tolist()  # fmt: skip
        tokens = [token for response in responses for token in response.token_ids]
        assert responses[-1].usage.prompt_tokens == len(prompt), f"prompt {index} tokenized differently"
        assert tokens == expected, f"prompt {index} ({len(prompt)} tokens)"
        assert "".join(response.text for response in responses) == reference_tokenizer.decode(
            expected, skip_special_tokens=True
        )


def test_the_capital_of_france_is_paris(address: str, reference_tokenizer: PreTrainedTokenizerBase) -> None:
    conversation = _ask("What is the capital of France?")
    assert chat_text(reference_tokenizer, conversation) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    with grpc.insecure_channel(address) as channel:
        responses = generate(pb_grpc.GenerationStub(channel), chat_request(conversation), ignore_eos=False)
        info = pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert "".join(response.text for response in responses) == "The capital of France is Paris."
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    assert info.model_name == "SmolLM2-135M-Instruct.Q4_1"
