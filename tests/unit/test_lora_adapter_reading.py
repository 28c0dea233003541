"""Reading PEFT LoRA adapters made by PEFT on the tiny model, and every refusal with its message."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.lora.adapter_config import read_adapter_config
from executor_service.lora.lora_weights import read_lora_weights
from executor_service.model.config import ModelConfig
from executor_service.tiny_model import TinyModelConfig, create_tiny_model
from tests.helpers.peft_adapters import make_peft_adapter

MAX_RANK = 16
PREFIX = "base_model.model.model.layers"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("base"), seed=0)


@pytest.fixture(scope="module")
def model_config(base_dir: Path) -> ModelConfig:
    return ModelConfig.from_pretrained_dir(base_dir)


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(
        base_dir, tmp_path_factory.mktemp("qv_r8"), rank=8, target_modules=["q_proj", "v_proj", "down_proj"],
        lora_alpha=16, seed=3,
    )


@pytest.fixture
def editable_adapter(adapter_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "adapter"
    shutil.copytree(adapter_dir, copy)
    return copy


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_reads_every_targeted_tensor_with_peft_names_and_shapes(adapter_dir, model_config):
    weights = read_lora_weights(adapter_dir, model_config, MAX_RANK)
    assert weights.config.rank == 8
    assert weights.config.target_modules == ("down_proj", "q_proj", "v_proj")
    assert weights.config.scaling == 2.0
    assert sorted(weights.lora_a) == sorted(
        (layer, m) for layer in range(model_config.num_layers) for m in ("down_proj", "q_proj", "v_proj")
    )
    assert weights.lora_a[(0, "q_proj")].shape == (8, 64)
    assert weights.lora_b[(0, "v_proj")].shape == (32, 8)
    assert weights.lora_a[(3, "down_proj")].shape == (8, 176)
    assert weights.lora_b[(3, "down_proj")].shape == (64, 8)
    raw = load_file(adapter_dir / "adapter_model.safetensors")
    assert torch.equal(weights.lora_a[(2, "q_proj")], raw[f"{PREFIX}.2.self_attn.q_proj.lora_A.weight"])
    assert torch.equal(weights.lora_b[(1, "down_proj")], raw[f"{PREFIX}.1.mlp.down_proj.lora_B.weight"])
    assert weights.num_bytes == sum(t.numel() * 4 for t in raw.values())


def test_bin_adapter_reads_like_safetensors(base_dir, model_config, tmp_path):
    safe = make_peft_adapter(base_dir, tmp_path / "safe", rank=4, target_modules=["k_proj"], lora_alpha=4, seed=1)
    binary = make_peft_adapter(
        base_dir, tmp_path / "bin", rank=4, target_modules=["k_proj"], lora_alpha=4, seed=1,
        safe_serialization=False,
    )
    assert (binary / "adapter_model.bin").is_file() and not (binary / "adapter_model.safetensors").exists()
    a, b = read_lora_weights(safe, model_config, MAX_RANK), read_lora_weights(binary, model_config, MAX_RANK)
    assert a.lora_a.keys() == b.lora_a.keys()
    assert all(torch.equal(a.lora_a[k], b.lora_a[k]) and torch.equal(a.lora_b[k], b.lora_b[k]) for k in a.lora_a)


@pytest.mark.parametrize(("use_rslora", "expected"), [(False, 32 / 16), (True, 32 / math.sqrt(16))])
def test_scaling_with_and_without_rslora(base_dir, tmp_path, use_rslora, expected):
    directory = make_peft_adapter(
        base_dir, tmp_path / "a", rank=16, target_modules=["o_proj"], lora_alpha=32, use_rslora=use_rslora
    )
    config = read_adapter_config(directory, MAX_RANK)
    assert config.use_rslora is use_rslora
    assert config.scaling == expected


def test_all_linear_targets_the_seven_projections(editable_adapter):
    edit_config(editable_adapter, target_modules="all-linear")
    assert read_adapter_config(editable_adapter, MAX_RANK).target_modules == (
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, r"DoRA \(use_dora\) is not supported"),
        ({"rank_pattern": {"q_proj": 4}}, r"per-module ranks \(rank_pattern\)"),
        ({"alpha_pattern": {"q_proj": 4}}, r"per-module alphas \(alpha_pattern\)"),
        ({"modules_to_save": ["lm_head"]}, r"modules_to_save"),
        ({"layers_to_transform": [0, 1]}, r"layers_to_transform"),
        ({"bias": "all"}, r"bias 'all' is not supported"),
        ({"bias": "lora_only"}, r"bias 'lora_only' is not supported"),
        ({"lora_bias": True}, r"lora_bias"),
        ({"peft_type": "IA3"}, r"peft_type 'IA3' is not supported"),
        ({"r": 32}, r"rank 32 exceeds --max-lora-rank 16"),
        ({"r": 0}, r"rank r must be a positive integer"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, r"\['embed_tokens'\] are not supported"),
        ({"target_modules": ".*attn.*"}, r"target_modules must be a non-empty list"),
    ],
)
def test_unsupported_configs_are_refused_by_name(editable_adapter, model_config, changes, message):
    edit_config(editable_adapter, **changes)
    with pytest.raises(ValueError, match=message) as error:
        read_lora_weights(editable_adapter, model_config, MAX_RANK)
    assert str(editable_adapter) in str(error.value)


def test_lm_head_target_made_by_peft_is_refused(base_dir, model_config, tmp_path):
    directory = make_peft_adapter(base_dir, tmp_path / "a", rank=4, target_modules=["q_proj", "lm_head"], lora_alpha=8)
    with pytest.raises(ValueError, match=r"\['lm_head'\] are not supported"):
        read_lora_weights(directory, model_config, MAX_RANK)


def test_shapes_of_another_model_are_refused(model_config, tmp_path):
    narrow = create_tiny_model(tmp_path / "narrow", seed=0, config=TinyModelConfig().with_hidden_size(32))
    directory = make_peft_adapter(narrow, tmp_path / "a", rank=4, target_modules=["q_proj"], lora_alpha=8)
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight' has shape \(4, 32\), the model needs \(4, 64\)"):
        read_lora_weights(directory, model_config, MAX_RANK)


def test_missing_tensor_is_named(editable_adapter, model_config):
    path = editable_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors[f"{PREFIX}.2.self_attn.v_proj.lora_B.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.v_proj\.lora_B\.weight is missing"):
        read_lora_weights(editable_adapter, model_config, MAX_RANK)


def test_tensor_of_an_untargeted_module_is_named(editable_adapter, model_config):
    path = editable_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"{PREFIX}.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(8, 64)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"k_proj\.lora_A\.weight' is for a module the config does not target"):
        read_lora_weights(editable_adapter, model_config, MAX_RANK)


def test_dora_magnitude_tensor_is_named(editable_adapter, model_config):
    path = editable_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"{PREFIX}.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"lora_magnitude_vector' is not a LoRA A/B weight"):
        read_lora_weights(editable_adapter, model_config, MAX_RANK)


def test_non_finite_weights_are_refused(editable_adapter, model_config):
    path = editable_adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"{PREFIX}.1.mlp.down_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"down_proj\.lora_A\.weight' must hold finite"):
        read_lora_weights(editable_adapter, model_config, MAX_RANK)


def test_paths_that_are_not_adapter_directories_are_refused(model_config, tmp_path, editable_adapter):
    with pytest.raises(ValueError, match=r"'/etc/passwd' is not a directory"):
        read_lora_weights("/etc/passwd", model_config, MAX_RANK)
    with pytest.raises(ValueError, match=r"holds no adapter_config.json"):
        read_lora_weights(tmp_path, model_config, MAX_RANK)
    (editable_adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"holds neither adapter_model.safetensors nor adapter_model.bin"):
        read_lora_weights(editable_adapter, model_config, MAX_RANK)


def test_corrupt_files_are_refused(editable_adapter, model_config):
    (editable_adapter / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"adapter weights are not readable"):
        read_lora_weights(editable_adapter, model_config, MAX_RANK)
    (editable_adapter / "adapter_config.json").write_text("{")
    with pytest.raises(ValueError, match=r"adapter_config.json: not readable JSON"):
        read_lora_weights(editable_adapter, model_config, MAX_RANK)
