"""LoRA device slots (zero padding, full overwrite, folded scaling), segment building and the batch delta."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from executor_service.lora.lora_batch import LoraBatch
from executor_service.lora.lora_segments import build_lora_segments
from executor_service.lora.lora_slots import LoraSlots, SlotContent
from executor_service.lora.lora_weights import LoraWeights, read_lora_weights
from executor_service.model.config import ModelConfig
from executor_service.ops.torch_ops import TorchOps
from executor_service.tiny_model import create_tiny_model
from tests.helpers.peft_adapters import make_peft_adapter

MAX_LORAS = 3
MAX_RANK = 16


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("base"), seed=0)


@pytest.fixture(scope="module")
def model_config(base_dir: Path) -> ModelConfig:
    return ModelConfig.from_pretrained_dir(base_dir)


@pytest.fixture(scope="module")
def qv_rank4(base_dir: Path, model_config: ModelConfig, tmp_path_factory: pytest.TempPathFactory) -> LoraWeights:
    directory = make_peft_adapter(
        base_dir, tmp_path_factory.mktemp("qv"), rank=4, target_modules=["q_proj", "v_proj"], lora_alpha=8, seed=1
    )
    return read_lora_weights(directory, model_config, MAX_RANK)


@pytest.fixture(scope="module")
def down_rank16_rslora(
    base_dir: Path, model_config: ModelConfig, tmp_path_factory: pytest.TempPathFactory
) -> LoraWeights:
    directory = make_peft_adapter(
        base_dir, tmp_path_factory.mktemp("down"), rank=16, target_modules=["down_proj"], lora_alpha=8,
        use_rslora=True, seed=2,
    )
    return read_lora_weights(directory, model_config, MAX_RANK)


def new_slots(model_config: ModelConfig) -> LoraSlots:
    slots = LoraSlots(model_config, MAX_LORAS, MAX_RANK, torch.float32, "cpu")
    slots.check_integrity()
    return slots


def test_load_writes_a_and_scaled_b_zero_padded(model_config, qv_rank4):
    slots = new_slots(model_config)
    slots.load(1, "qv", "/adapters/qv", qv_rank4)
    slots.check_integrity()
    assert slots.contents == [None, SlotContent("qv", "/adapters/qv", 4, 2.0, frozenset({"q_proj", "v_proj"})), None]
    for layer in range(model_config.num_layers):
        a, b = slots.lora_a[layer]["q_proj"], slots.lora_b[layer]["v_proj"]
        assert torch.equal(a[1, :4], qv_rank4.lora_a[(layer, "q_proj")])
        assert torch.equal(b[1, :, :4], qv_rank4.lora_b[(layer, "v_proj")] * 2.0)
        assert not a[1, 4:].any() and not b[1, :, 4:].any()
        assert not a[0].any() and not a[2].any()
        assert not slots.lora_a[layer]["k_proj"].any() and not slots.lora_b[layer]["down_proj"].any()


def test_reload_overwrites_the_whole_slot(model_config, qv_rank4, down_rank16_rslora):
    slots = new_slots(model_config)
    slots.load(0, "qv", "/adapters/qv", qv_rank4)
    slots.load(2, "qv", "/adapters/qv", qv_rank4)
    slots.load(0, "down", "/adapters/down", down_rank16_rslora)
    slots.check_integrity()
    assert slots.contents[0] == SlotContent("down", "/adapters/down", 16, 2.0, frozenset({"down_proj"}))
    assert slots.contents[2] is not None and slots.contents[2].adapter_name == "qv"
    for layer in range(model_config.num_layers):
        assert not slots.lora_a[layer]["q_proj"][0].any() and not slots.lora_b[layer]["v_proj"][0].any()
        assert torch.equal(slots.lora_a[layer]["down_proj"][0], down_rank16_rslora.lora_a[(layer, "down_proj")])
        # rsLoRA: lora_alpha / sqrt(rank) = 8 / 4.
        assert torch.equal(slots.lora_b[layer]["down_proj"][0], down_rank16_rslora.lora_b[(layer, "down_proj")] * 2.0)
        assert torch.equal(slots.lora_a[layer]["q_proj"][2, :4], qv_rank4.lora_a[(layer, "q_proj")])
    assert slots.target_modules([0]) == {"down_proj"}
    assert slots.target_modules([0, 1, 2]) == {"down_proj", "q_proj", "v_proj"}
    slots.clear()
    slots.check_integrity()
    assert slots.contents == [None, None, None]
    assert slots.target_modules(range(MAX_LORAS)) == frozenset()


def test_slot_out_of_range_and_rank_over_the_maximum_are_refused(model_config, qv_rank4, down_rank16_rslora):
    slots = new_slots(model_config)
    with pytest.raises(ValueError, match=r"LoRA slot 3 out of range \[0, 3\)"):
        slots.load(3, "qv", "/adapters/qv", qv_rank4)
    small = LoraSlots(model_config, MAX_LORAS, 8, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"rank 16 > max_lora_rank 8"):
        small.load(0, "down", "/adapters/down", down_rank16_rslora)
    small.check_integrity()


@pytest.mark.parametrize(
    ("lora_slots", "query_lens", "starts", "slot_ids"),
    [
        ([None, None], [3, 1], None, None),
        ([0], [5], (0, 5), (0,)),
        ([None, 1, 1, None, 2, None], [2, 3, 1, 4, 2, 1], (2, 6, 10, 12), (1, -1, 2)),
        ([0, 1, 0], [1, 1, 1], (0, 1, 2, 3), (0, 1, 0)),
        ([2, None, None, 2], [1, 2, 3, 1], (0, 1, 6, 7), (2, -1, 2)),
    ],
)
def test_segments_are_runs_of_equal_slots_trimmed_of_base_rows(lora_slots, query_lens, starts, slot_ids):
    segments = build_lora_segments(lora_slots, query_lens, "cpu")
    if starts is None:
        assert segments is None
        return
    assert segments is not None
    assert (segments.starts_cpu, segments.slot_ids_cpu) == (starts, slot_ids)
    assert segments.starts.tolist() == list(starts) and segments.slot_ids.tolist() == list(slot_ids)


def test_batch_delta_equals_dense_lora_on_adapter_rows_only(model_config, qv_rank4, down_rank16_rslora):
    slots = new_slots(model_config)
    slots.load(0, "qv", "/adapters/qv", qv_rank4)
    slots.load(2, "down", "/adapters/down", down_rank16_rslora)
    segments = build_lora_segments([None, 0, None, 2], [2, 3, 1, 2], "cpu")
    batch = LoraBatch(slots, segments, TorchOps(), num_tokens=8)
    assert batch.target_modules == {"q_proj", "v_proj", "down_proj"}
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    base = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    out = base.clone()
    batch.add_delta(1, "q_proj", x, out)
    a, b = qv_rank4.lora_a[(1, "q_proj")], qv_rank4.lora_b[(1, "q_proj")]
    expected = base.clone()
    expected[2:5] += (x[2:5] @ a.T @ b.T) * 2.0
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:2], base[:2]) and torch.equal(out[5:], base[5:])
    untouched = base.clone()
    batch.add_delta(1, "k_proj", x, untouched)  # no slot of the step targets k_proj
    assert torch.equal(untouched, base)
