"""PEFT-format LoRA adapters of the bench model, written directly with safetensors (no peft needed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from executor_service.model.config import ModelConfig
from shared.lora.target_modules import LORA_TARGET_MODULES, ProjectionSizes, module_parent, module_shapes

# With hidden 512 and rank 16, N(0, 0.02^2) A and B make a delta of a few percent of the projection:
# enough to change greedy tokens, not enough to make the outputs degenerate. Throughput does not
# depend on the values (EOS is ignored).
INIT_STD = 0.02


def adapter_tensors(
    model: ProjectionSizes, rank: int, target_modules: tuple[str, ...], seed: int
) -> dict[str, torch.Tensor]:
    """PEFT's `save_pretrained` keys (`base_model.model.model.layers.L.{self_attn,mlp}.M.lora_{A,B}.weight`)
    with A `[rank, in]` and B `[out, rank]` drawn from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    shapes = module_shapes(model)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(model.num_layers):
        for module in target_modules:
            in_features, out_features = shapes[module]
            prefix = f"base_model.model.model.layers.{layer}.{module_parent(module)}.{module}"
            lora_a = torch.randn(rank, in_features, generator=generator) * INIT_STD
            lora_b = torch.randn(out_features, rank, generator=generator) * INIT_STD
            tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = lora_a, lora_b
    return tensors


def adapter_config(
    rank: int, lora_alpha: float, target_modules: tuple[str, ...], base_model_dir: Path
) -> dict[str, object]:
    """The `adapter_config.json` PEFT writes for a plain LoRA (no DoRA, no bias, no rsLoRA)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_dir),
        "r": rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def write_bench_adapter(
    base_model_dir: Path, out_dir: Path, *, rank: int, seed: int,
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES,
) -> Path:
    """Writes an adapter of the checkpoint in `base_model_dir` (`adapter_config.json` and
    `adapter_model.safetensors`, lora_alpha = 2 x rank) into `out_dir`; returns it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config_json = adapter_config(rank, 2.0 * rank, target_modules, base_model_dir)
    (out_dir / "adapter_config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    tensors = adapter_tensors(ModelConfig.from_pretrained_dir(base_model_dir), rank, target_modules, seed)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
