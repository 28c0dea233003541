"""N-gram speculative decoding end to end, real processes: a concurrent greedy batch with mixed prompt
lengths, chunked prefill, a small KV pool (preemption) and shared prefixes equals transformers token for
token and pagewire without speculation; seeded sampling gives the same tokens with it on or off; stops
inside an accepted run end the stream exactly there; ServerInfo and /metrics count the drafts."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import free_port, running_server

NUM_NEW_TOKENS = 40
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}'


def _prompts() -> list[list[int]]:
    """Repetitive prompts (n-gram lookup finds drafts in them), random ones, and two sharing a prefix."""
    generator = torch.Generator().manual_seed(11)
    shared = torch.randint(3, 250, (40,), generator=generator).tolist()
    looped = [(i % 7) + 10 for i in range(30)]
    return [
        looped,
        [5, 6, 7, 8] * 6,
        torch.randint(3, 250, (90,), generator=generator).tolist(),
        torch.randint(3, 250, (7,), generator=generator).tolist(),
        shared + [1, 2, 3],
        shared + [4, 5],
        list(range(20, 60)) + list(range(20, 40)),
        [9] * 12,
    ]


PROMPTS = _prompts()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("spec") / "tiny", seed=3)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return [
        model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                       max_new_tokens=NUM_NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
        for p in PROMPTS
    ]


SCHEDULER_ARGS = ("--max-num-batched-tokens", "32", "--max-num-seqs", "8", "--max-model-len", "256")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[tuple[str, str]]:
    """Speculation on; 24 blocks of 16 tokens for 8 requests of up to 130 tokens: preemption."""
    port = free_port()
    with running_server(model_dir, executor_args=("--num-gpu-blocks-override", "24"),
                        scheduler_args=(*SCHEDULER_ARGS, "--speculative-config", NGRAM,
                                        "--http-port", str(port))) as address:
        yield address, f"http://127.0.0.1:{port}"


def generate(address: str, prompt: list[int], **sampling: object) -> list[pb.GenerateResponse]:
    options = {"temperature": 0.0, "max_tokens": NUM_NEW_TOKENS, "ignore_eos": True, **sampling}
    message = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(**options))
    with grpc.insecure_channel(address) as channel:
        return list(pb_grpc.GenerationStub(channel).Generate(message, timeout=300))


def tokens(responses: list[pb.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def run_all(address: str, **sampling: object) -> list[list[int]]:
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return [tokens(r) for r in pool.map(lambda p: generate(address, p, **sampling), PROMPTS)]


def server_info(address: str) -> pb.ServerInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)


def test_greedy_with_ngram_speculation_equals_transformers(server: tuple[str, str], reference: list[list[int]]) -> None:
    address = server[0]
    assert run_all(address) == reference
    info = server_info(address)
    assert info.num_drafts > 0 and 0 < info.num_accepted_draft_tokens <= info.num_draft_tokens
    assert len(info.num_accepted_per_position) == 4
    assert info.num_accepted_per_position[0] >= info.num_accepted_per_position[-1]
    assert info.num_preemptions > 0
    assert info.num_free_device_blocks == info.num_device_blocks and info.num_running == 0


def test_seeded_sampling_gives_the_same_tokens_with_speculation_on_or_off(
    server: tuple[str, str], model_dir: Path
) -> None:
    sampling = {"temperature": 0.8, "top_k": 20, "seed": 1234, "max_tokens": 24}
    with_spec = [tokens(generate(server[0], p, **sampling)) for p in PROMPTS[:4]]
    opted_out = [tokens(generate(server[0], p, speculative=False, **sampling)) for p in PROMPTS[:4]]
    assert with_spec == opted_out
    with running_server(model_dir, scheduler_args=SCHEDULER_ARGS) as plain:
        assert [tokens(generate(plain, p, **sampling)) for p in PROMPTS[:4]] == with_spec


def test_a_stop_token_inside_an_accepted_run_ends_the_stream_there(
    server: tuple[str, str], reference: list[list[int]]
) -> None:
    """The looped prompt's answer is speculated in runs; stopping at its 10th token returns 10 tokens."""
    stop_at = reference[0][9]
    first = reference[0].index(stop_at)
    responses = generate(server[0], PROMPTS[0], stop_token_ids=[stop_at])
    assert tokens(responses) == reference[0][: first + 1]
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    short = generate(server[0], PROMPTS[0], max_tokens=5)
    assert tokens(short) == reference[0][:5] and short[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_metrics_count_drafts_with_vllms_names(server: tuple[str, str]) -> None:
    generate(server[0], PROMPTS[1], max_tokens=8)
    with urllib.request.urlopen(server[1] + "/metrics", timeout=10) as response:
        text = response.read().decode()
    values = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("vllm:spec_decode") and not line.startswith("#")}
    assert values["vllm:spec_decode_num_drafts_total"] > 0
    assert 0 < values["vllm:spec_decode_num_accepted_tokens_total"] <= values["vllm:spec_decode_num_draft_tokens_total"]
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="tiny",position="0"}' in text
