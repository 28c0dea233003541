"""The scheduler reads PEFT adapters without torch: what it accepts from adapters PEFT saved, and every
refusal, each with a message naming the problem."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from executor_service.tiny_model import TinyModelConfig, create_tiny_model
from scheduler_service.lora.adapter_files import LoraModelShape, inspect_adapter
from tests.helpers.peft_adapters import make_peft_adapter

SHAPE = LoraModelShape(num_layers=4, hidden_size=64, intermediate_size=176, q_size=64, kv_size=32)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("base") / "tiny", seed=0)


@pytest.fixture(scope="module")
def adapter(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(base, tmp_path_factory.mktemp("a") / "a", rank=8, lora_alpha=16,
                             target_modules=["q_proj", "v_proj", "down_proj"])


def copy_with_config(adapter: Path, tmp_path: Path, **changes: object) -> Path:
    out = tmp_path / "changed"
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config.update(changes)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return out


def test_a_peft_adapter_is_read_with_its_rank_targets_and_scaling(adapter: Path) -> None:
    spec = inspect_adapter(str(adapter), SHAPE, max_rank=16)
    assert (spec.rank, spec.target_modules, spec.config.lora_alpha, spec.config.use_rslora) == (
        8, ("down_proj", "q_proj", "v_proj"), 16.0, False)
    assert spec.scaling == 2.0
    assert spec.path == str(adapter.resolve())


def test_rslora_scales_by_the_square_root_of_the_rank(base: Path, tmp_path: Path) -> None:
    made = make_peft_adapter(base, tmp_path / "rs", rank=4, lora_alpha=8, target_modules=["o_proj"], use_rslora=True)
    spec = inspect_adapter(str(made), SHAPE, max_rank=16)
    assert spec.config.use_rslora and spec.scaling == 8 / math.sqrt(4)


def test_a_torch_bin_adapter_is_read_without_torch_by_shapes_only(base: Path, tmp_path: Path) -> None:
    made = make_peft_adapter(base, tmp_path / "bin", rank=4, lora_alpha=4,
                             target_modules=["k_proj", "gate_proj", "up_proj"], safe_serialization=False)
    assert (made / "adapter_model.bin").is_file() and not (made / "adapter_model.safetensors").exists()
    spec = inspect_adapter(str(made), SHAPE, max_rank=16)
    assert spec.target_modules == ("gate_proj", "k_proj", "up_proj") and spec.rank == 4


def test_a_bin_whose_pickle_calls_anything_else_is_refused(adapter: Path, tmp_path: Path) -> None:
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    out = copy_with_config(adapter, tmp_path)
    (out / "adapter_model.safetensors").unlink()
    with zipfile.ZipFile(out / "adapter_model.bin", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
    with pytest.raises(ValueError, match="does not hold builtins.print"):
        inspect_adapter(str(out), SHAPE, max_rank=16)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "bias 'all' is not supported"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, r"target modules \['embed_tokens'\] are not supported"),
        ({"target_modules": ["lm_head"]}, r"\['lm_head'\] are not supported"),
        ({"target_modules": ".*proj"}, "target_modules must be a non-empty list"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"rank_pattern": {"q_proj": 4}}, "rank_pattern"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"peft_type": "IA3"}, "peft_type 'IA3'"),
        ({"r": 0}, "rank r must be a positive integer"),
    ],
)
def test_unsupported_adapters_are_refused_naming_what(adapter: Path, tmp_path: Path, changes: dict,
                                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        inspect_adapter(str(copy_with_config(adapter, tmp_path, **changes)), SHAPE, max_rank=16)


def test_a_rank_above_max_lora_rank_is_refused(adapter: Path) -> None:
    with pytest.raises(ValueError, match="rank 8 exceeds --max-lora-rank 4"):
        inspect_adapter(str(adapter), SHAPE, max_rank=4)


def test_an_adapter_of_another_model_is_refused_by_shape(base: Path, tmp_path: Path) -> None:
    other = create_tiny_model(tmp_path / "wide", seed=0, config=TinyModelConfig(hidden_size=96, num_attention_heads=4))
    made = make_peft_adapter(other, tmp_path / "wide_a", rank=4, lora_alpha=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"layer 0 q_proj.lora_A has shape \[4, 96\], the model needs \[4, 64\]"):
        inspect_adapter(str(made), SHAPE, max_rank=16)


def test_an_adapter_for_more_layers_is_refused(adapter: Path) -> None:
    fewer = LoraModelShape(num_layers=2, hidden_size=64, intermediate_size=176, q_size=64, kv_size=32)
    with pytest.raises(ValueError, match="is for layer 2; the model has 2"):
        inspect_adapter(str(adapter), fewer, max_rank=16)


def test_a_target_without_its_tensors_is_refused(adapter: Path, tmp_path: Path) -> None:
    out = copy_with_config(adapter, tmp_path, target_modules=["q_proj", "v_proj", "down_proj", "o_proj"])
    with pytest.raises(ValueError, match="layer 0 o_proj.lora_A is missing"):
        inspect_adapter(str(out), SHAPE, max_rank=16)


def test_files_that_are_not_an_adapter_are_refused(adapter: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'/etc/passwd' is not a directory"):
        inspect_adapter("/etc/passwd", SHAPE, max_rank=16)
    with pytest.raises(ValueError, match="is not a directory"):
        inspect_adapter(str(tmp_path / "missing"), SHAPE, max_rank=16)
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        inspect_adapter(str(tmp_path), SHAPE, max_rank=16)
    broken = copy_with_config(adapter, tmp_path)
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        inspect_adapter(str(broken), SHAPE, max_rank=16)


def test_a_truncated_or_missing_weights_file_is_refused(adapter: Path, tmp_path: Path) -> None:
    out = copy_with_config(adapter, tmp_path)
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is truncated"):
        inspect_adapter(str(out), SHAPE, max_rank=16)
    weights.write_bytes(b"\x01")
    with pytest.raises(ValueError, match="too short to be a safetensors file"):
        inspect_adapter(str(out), SHAPE, max_rank=16)
    weights.unlink()
    with pytest.raises(ValueError, match="has neither adapter_model.safetensors nor adapter_model.bin"):
        inspect_adapter(str(out), SHAPE, max_rank=16)
