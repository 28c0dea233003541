"""Draft-model speculative decoding end to end, real processes: with a draft made by `pagewire
create-draft-model` (the target itself, always right, or its first layer, mostly wrong), a concurrent
greedy batch with mixed prompt lengths, chunked prefill, a small KV pool (preemption) and a shared
prefix equals transformers token for token; every block is free afterwards; ServerInfo counts the
drafts; a scheduler asking for model drafts refuses an executor without a draft model."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.hf_reference import hf_greedy_all
from tests.helpers.processes import running_executor, running_server

NUM_NEW_TOKENS = 32
SCHEDULER_ARGS = ("--max-num-batched-tokens", "32", "--max-num-seqs", "6", "--max-model-len", "128")


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(5)
    shared = torch.randint(3, 250, (40,), generator=generator).tolist()
    return [
        torch.randint(3, 250, (70,), generator=generator).tolist(),  # chunked: 3 steps of 32
        torch.randint(3, 250, (5,), generator=generator).tolist(),
        shared + [1, 2, 3],
        shared + [4, 5],  # a prefix hit on the one before
        [9] * 12,
        torch.randint(3, 250, (21,), generator=generator).tolist(),
    ]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("draft_serving")
    target = create_tiny_model(root / "target", seed=8)
    drafts = {"self": 4, "one_layer": 1}
    for name, num_layers in drafts.items():
        subprocess.run([sys.executable, "-m", "pagewire", "create-draft-model", str(target), str(root / name),
                        "--num-layers", str(num_layers)], check=True, stdout=subprocess.DEVNULL)
    return {"target": target, **{name: root / name for name in drafts}}


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> list[list[int]]:
    return hf_greedy_all(models["target"], PROMPTS, NUM_NEW_TOKENS)


def _config(draft_dir: Path) -> str:
    # Not adaptive: on this CPU the policy finds that a draft never pays and stops drafting, but here
    # every step should draft, through preemption, chunked prefill and the prefix hit.
    return json.dumps({"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 3,
                       "adaptive": False})


@pytest.fixture(scope="module", params=["self", "one_layer"])
def server(request: pytest.FixtureRequest, models: dict[str, Path]) -> Iterator[tuple[str, str]]:
    """12 blocks of 16 tokens (192 slots) for 6 requests of 37 to 102 tokens (385 together): preemption."""
    config = _config(models[request.param])
    with running_server(models["target"], executor_args=("--num-gpu-blocks-override", "12", "--speculative-config",
                                                         config),
                        scheduler_args=(*SCHEDULER_ARGS, "--speculative-config", config)) as address:
        yield request.param, address


def generate(address: str, prompt: list[int]) -> list[int]:
    sampling = pb.SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    message = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=sampling)
    with grpc.insecure_channel(address) as channel:
        return [t for r in pb_grpc.GenerationStub(channel).Generate(message, timeout=300) for t in r.token_ids]


def server_info(address: str) -> pb.ServerInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)


def test_greedy_with_a_draft_model_equals_transformers(server: tuple[str, str], reference: list[list[int]]) -> None:
    name, address = server
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        assert list(pool.map(lambda p: generate(address, p), PROMPTS)) == reference
    info = server_info(address)
    assert info.num_drafts > 0 and info.num_draft_tokens > 0
    if name == "self":
        assert info.num_accepted_draft_tokens == info.num_draft_tokens
    else:
        assert info.num_accepted_draft_tokens < info.num_draft_tokens
    assert info.num_preemptions > 0
    assert info.num_free_device_blocks == info.num_device_blocks and info.num_running == 0


def test_a_scheduler_asking_for_model_drafts_refuses_an_executor_without_a_draft_model(
    models: dict[str, Path]
) -> None:
    with running_executor(models["target"]) as executor_address:
        scheduler = subprocess.run(
            [sys.executable, "-m", "pagewire", "scheduler", "--executor", executor_address, "--port", "0",
             "--http-port", "0", "--speculative-config", _config(models["one_layer"])],
            capture_output=True, text=True, timeout=120,
        )
    assert scheduler.returncode != 0
    assert "has no draft model: start it with the same --speculative-config" in scheduler.stderr
