"""The benchmark model: a loadable checkpoint from a seed, and FLOP counts that match its weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.bench_model import BenchModelConfig, create_bench_model, describe
from benchmarks.roofline import roofline_fraction, workload_flops
from benchmarks.workloads import BenchRequest

SMALL = BenchModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_kv_heads=2,
    intermediate_size=176,
    vocab_size=600,
    max_position_embeddings=256,
)


def test_checkpoint_is_reproducible_and_counts_match_its_weights(tmp_path: Path) -> None:
    first = load_file(create_bench_model(tmp_path / "a", SMALL, seed=1) / "model.safetensors")
    second = load_file(create_bench_model(tmp_path / "b", SMALL, seed=1) / "model.safetensors")
    other = load_file(create_bench_model(tmp_path / "c", SMALL, seed=2) / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])
    layer_weights = sum(
        t.numel() for name, t in first.items() if name.startswith("model.layers.0.") and t.dim() == 2
    )
    assert layer_weights == SMALL.num_layer_params
    assert first["lm_head.weight"].shape == (600, 64)
    assert describe(SMALL)["num_params"] == sum(t.numel() for t in first.values() if t.dim() == 2)


def test_transformers_and_pagewire_both_read_the_checkpoint(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from executor_service.model.config import ModelConfig

    path = create_bench_model(tmp_path, SMALL, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert model.config.vocab_size == 600 and model.config.num_key_value_heads == 2
    config = ModelConfig.from_pretrained_dir(path)
    assert (config.vocab_size, config.num_layers, config.head_dim) == (600, 2, 16)


def test_request_flops_count_body_tokens_attention_and_lm_heads() -> None:
    # 3 prompt tokens and 2 outputs: 4 tokens through the body attending to 1..4 keys, 2 LM heads.
    body = 2 * SMALL.num_layers * SMALL.num_layer_params
    attention_per_key = SMALL.num_layers * 4 * SMALL.hidden_size
    expected = 4 * body + attention_per_key * (1 + 2 + 3 + 4) + 2 * 2 * 64 * 600
    assert SMALL.request_flops(3, 2) == expected
    requests = [BenchRequest(2, prompt_token_ids=(1, 2, 3)), BenchRequest(2, prompt_token_ids=(1, 2, 3))]
    assert workload_flops(SMALL, requests) == 2 * expected
    assert SMALL.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4


def test_roofline_fraction_is_achieved_over_peak() -> None:
    assert roofline_fraction(flops=6e9, duration_s=2.0, peak_flops_per_s=1e10) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        roofline_fraction(flops=1.0, duration_s=0.0, peak_flops_per_s=1.0)


def test_config_rejects_shapes_that_do_not_divide() -> None:
    with pytest.raises(ValueError, match="must divide"):
        BenchModelConfig(hidden_size=100, num_attention_heads=8)
