"""The transformers baselines: what they count, how they batch, and their time limit."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_model import BenchModelConfig, create_bench_model
from benchmarks.hf_baselines import (
    ContinuousBatchingSettings,
    RunTooSlow,
    load_hf_model,
    run_generate_batch,
    run_static_generate,
)
from benchmarks.system_run import HF_GENERATE, HF_GENERATE_BATCH
from benchmarks.workloads import BenchRequest

SMALL = BenchModelConfig(
    num_layers=1,
    hidden_size=32,
    num_attention_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    vocab_size=300,
    max_position_embeddings=256,
)
SETTINGS = ContinuousBatchingSettings(
    page_size=16, num_blocks=64, max_batch_tokens=64, max_requests_per_batch=4
)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    return load_hf_model(create_bench_model(tmp_path_factory.mktemp("bench-model"), SMALL, seed=0))


def prompts(lengths: list[int], max_tokens: list[int]) -> list[BenchRequest]:
    generator = torch.Generator().manual_seed(1)
    return [
        BenchRequest(m, prompt_token_ids=tuple(torch.randint(1, 300, (n,), generator=generator).tolist()))
        for n, m in zip(lengths, max_tokens)
    ]


def test_static_generate_counts_only_the_requested_tokens(model) -> None:
    requests = prompts([5, 9, 3], [2, 6, 4])
    run = run_static_generate(model, requests, "B", batch_size=2, num_threads=1)
    assert (run.system, run.workload, run.num_threads) == (HF_GENERATE, "B", 1)
    assert [len(o) for o in run.outputs] == [2, 6, 4]
    assert (run.num_prompt_tokens, run.num_output_tokens) == (17, 12)
    # Left padding with an attention mask: each request's tokens do not depend on its batch.
    alone = [run_static_generate(model, [r], "B", batch_size=1, num_threads=1).outputs[0] for r in requests]
    assert list(run.outputs) == alone


def test_generate_batch_matches_static_generate_and_needs_one_length(model) -> None:
    requests = prompts([5, 9, 3], [4, 4, 4])
    run = run_generate_batch(model, requests, "A", SETTINGS, num_threads=1)
    assert (run.system, run.num_output_tokens) == (HF_GENERATE_BATCH, 12)
    assert run.outputs == run_static_generate(model, requests, "A", batch_size=2, num_threads=1).outputs
    with pytest.raises(ValueError, match="one output length"):
        run_generate_batch(model, prompts([5, 9], [4, 5]), "B", SETTINGS, num_threads=1)


def test_static_generate_is_abandoned_past_its_time_limit_and_restores_threads(model) -> None:
    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with pytest.raises(RunTooSlow, match="2 of 3 requests"):
        run_static_generate(model, prompts([5, 9, 3], [2, 2, 2]), "A", 2, num_threads=other, time_limit_s=0.0)
    assert torch.get_num_threads() == before
