"""LoRA on a real checkpoint: SmolLM2-135M-Instruct served from its GGUF file, with two PEFT adapters
made on transformers' reading of the same file; a concurrent batch of the base model and both adapters
equals PEFT's greedy tokens."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagewire.default_model import default_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.peft_adapters import make_peft_adapter_of, peft_greedy_of
from tests.helpers.processes import running_server

NUM_NEW_TOKENS = 12
PROMPTS = {
    "": "The capital of France is",
    "qv": "The capital of France is",  # the same prompt: the adapter must change the answer
    "mlp": "Once upon a time, in a small village by the sea,",
}


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return default_model()


@pytest.fixture(scope="module")
def base_model(gguf_path: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(gguf_path: Path) -> dict[str, list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    return {name: tokenizer(text)["input_ids"] for name, text in PROMPTS.items()}


@pytest.fixture(scope="module")
def adapter_dirs(base_model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smollm2_adapters")
    return {
        "qv": make_peft_adapter_of(base_model, root / "qv", rank=8, target_modules=["q_proj", "v_proj"],
                                   lora_alpha=16, seed=1, init_scale=0.06),
        "mlp": make_peft_adapter_of(base_model, root / "mlp", rank=16, lora_alpha=16, use_rslora=True, seed=2,
                                    target_modules=["o_proj", "gate_proj", "up_proj", "down_proj"], init_scale=0.06),
    }


def test_base_and_two_adapters_on_smollm2_equal_peft(
    gguf_path: Path, base_model: torch.nn.Module, prompt_ids: dict[str, list[int]], adapter_dirs: dict[str, Path]
) -> None:
    expected = {
        name: peft_greedy_of(base_model, adapter_dirs.get(name), prompt_ids[name], NUM_NEW_TOKENS) for name in PROMPTS
    }
    assert expected["qv"] != expected[""], "the adapter does not change the greedy answer"
    lora_modules = [f"{name}={path}" for name, path in adapter_dirs.items()]
    with running_server(
        gguf_path,
        executor_args=("--enable-lora", "--max-loras", "2", "--max-lora-rank", "16"),
        scheduler_args=("--enable-lora", "--lora-modules", *lora_modules, "--max-model-len", "512"),
    ) as address:
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(address))

        def generate(name: str) -> list[int]:
            message = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=prompt_ids[name]), adapter=name,
                sampling=pb.SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True),
            )
            return [t for response in stub.Generate(message, timeout=300) for t in response.token_ids]

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = dict(zip(PROMPTS, pool.map(generate, PROMPTS), strict=True))
    assert got == expected
