"""A PEFT LoRA adapter's weights read from its directory and checked against the model's shapes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from shared.lora.adapter_config import LoraAdapterConfig, adapter_directory, read_adapter_config
from shared.lora.target_modules import ProjectionSizes, module_parent, module_shapes

SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight")


@dataclass(frozen=True, slots=True)
class LoraWeights:
    """One adapter on the host: `lora_a[(layer, module)]` `[rank, in]` and `lora_b[(layer, module)]`
    `[out, rank]` (PEFT's `lora_A.weight` / `lora_B.weight`, unscaled, in the file's dtype), for every
    layer and every module in `config.target_modules`."""

    config: LoraAdapterConfig
    lora_a: dict[tuple[int, str], torch.Tensor]
    lora_b: dict[tuple[int, str], torch.Tensor]

    @property
    def num_bytes(self) -> int:
        tensors = (*self.lora_a.values(), *self.lora_b.values())
        return sum(t.numel() * t.element_size() for t in tensors)


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = directory / SAFETENSORS_FILE, directory / BIN_FILE
    try:
        if safetensors_path.is_file():
            return load_file(safetensors_path)
        if bin_path.is_file():
            tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
            if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError(f"{bin_path}: not a state dict of tensors")
            return tensors
    except (OSError, SafetensorError, RuntimeError, EOFError) as error:
        raise ValueError(f"{directory}: adapter weights are not readable ({error})") from error
    raise ValueError(f"LoRA adapter directory {str(directory)!r} holds neither {SAFETENSORS_FILE} nor {BIN_FILE}")


def read_lora_weights(path: str | Path, model: ProjectionSizes, max_lora_rank: int) -> LoraWeights:
    """Reads and checks an adapter directory against `model`; ValueError naming the offending key,
    module, shape or setting (see `read_adapter_config` for the config checks)."""
    directory = adapter_directory(path)
    config = read_adapter_config(directory, max_lora_rank)
    shapes = module_shapes(model)
    lora_a: dict[tuple[int, str], torch.Tensor] = {}
    lora_b: dict[tuple[int, str], torch.Tensor] = {}
    for key, tensor in sorted(_read_tensors(directory).items()):
        match = _KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{directory}: tensor {key!r} is not a LoRA A/B weight of a decoder projection "
                "(embedding, lm_head, DoRA and bias tensors are not supported)"
            )
        layer, parent, module, which = int(match[1]), match[2], match[3], match[4]
        if module not in config.target_modules or parent != module_parent(module):
            raise ValueError(f"{directory}: tensor {key!r} is for a module the config does not target")
        if layer >= model.num_layers:
            raise ValueError(f"{directory}: tensor {key!r} is for layer {layer}; the model has {model.num_layers}")
        in_features, out_features = shapes[module]
        expected = (config.rank, in_features) if which == "A" else (out_features, config.rank)
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"{directory}: tensor {key!r} has shape {tuple(tensor.shape)}, the model needs {expected}"
            )
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{directory}: tensor {key!r} must hold finite floating-point values")
        (lora_a if which == "A" else lora_b)[(layer, module)] = tensor.contiguous()
    for layer in range(model.num_layers):
        for module in config.target_modules:
            for which, found in (("A", lora_a), ("B", lora_b)):
                if (layer, module) not in found:
                    raise ValueError(
                        f"{directory}: tensor base_model.model.model.layers.{layer}.{module_parent(module)}."
                        f"{module}.lora_{which}.weight is missing"
                    )
    return LoraWeights(config=config, lora_a=lora_a, lora_b=lora_b)
