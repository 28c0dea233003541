"""End to end over the public Generate API: real executor and scheduler processes vs transformers."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.hf_reference import hf_greedy_all
from tests.helpers.processes import running_server

NUM_REQUESTS = 16
NUM_NEW_TOKENS = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    lengths = torch.linspace(5, 300, NUM_REQUESTS).round().int().tolist()
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    return hf_greedy_all(model_dir, prompts, NUM_NEW_TOKENS)


def greedy_request(prompt: list[int], max_tokens: int = NUM_NEW_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


def collect(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> tuple[list[int], list[pb.GenerateResponse]]:
    responses = list(stub.Generate(request, timeout=300))
    return [t for r in responses for t in r.token_ids], responses


def run_all(address: str, prompts: list[list[int]]) -> list[list[int]]:
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with ThreadPoolExecutor(NUM_REQUESTS) as pool:
            results = list(pool.map(lambda p: collect(stub, greedy_request(p)), prompts))
        for tokens, responses in results:
            assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
            assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
            assert responses[-1].usage.completion_tokens == len(tokens) == NUM_NEW_TOKENS
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        assert info.num_free_device_blocks == info.num_device_blocks
        assert (info.num_running, info.num_waiting) == (0, 0)
    return [tokens for tokens, _ in results], info


@pytest.mark.parametrize(
    ("executor_args", "scheduler_args", "expect_preemption"),
    [
        pytest.param((), (), False, id="default"),
        pytest.param((), ("--max-num-batched-tokens", "64", "--max-num-seqs", "16"), False, id="chunked-prefill"),
        pytest.param(("--num-gpu-blocks-override", "40"), ("--max-model-len", "512"), True, id="preemption"),
    ],
)
def test_concurrent_greedy_requests_match_transformers(
    model_dir: Path, prompts: list[list[int]], reference: list[list[int]],
    executor_args: tuple[str, ...], scheduler_args: tuple[str, ...], expect_preemption: bool,
) -> None:
    with running_server(model_dir, executor_args, scheduler_args) as address:
        outputs, info = run_all(address, prompts)
    for i, (got, want) in enumerate(zip(outputs, reference)):
        assert got == want, f"request {i} (prompt of {len(prompts[i])} tokens)"
    assert (info.num_preemptions > 0) == expect_preemption
    assert info.num_prompt_tokens_computed >= sum(len(p) for p in prompts)
