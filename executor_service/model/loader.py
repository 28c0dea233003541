"""Loads a Hugging Face Llama-family checkpoint (safetensors) into `LlamaForCausalLM`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from executor_service.model.config import ModelConfig
from executor_service.model.llama import LlamaForCausalLM
from executor_service.ops.base import OpsBackend

# Checkpoint tensors that carry no weights of ours (old Llama exports saved the RoPE table).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def load_model(
    model_dir: str, dtype: torch.dtype, device: torch.device, ops: OpsBackend
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Builds the model described by `model_dir/config.json` and fills it from its safetensors files.

    Every parameter must be covered by the checkpoint and every checkpoint tensor must map to a
    parameter (a tied model may carry a redundant `lm_head.weight`); otherwise `ValueError` names the
    missing or unexpected tensors. Weights are cast to `dtype` and placed on `device`.
    """
    config = ModelConfig.from_pretrained_dir(model_dir)
    model = LlamaForCausalLM(config, ops, dtype=dtype, device=device)
    parameters = dict(model.named_parameters())
    # Each parameter is made of row shards; all of them must arrive exactly once.
    pending: dict[str, set[str]] = {name: set(shards) for name, shards in _expected_shards(model).items()}
    unexpected: list[str] = []
    with torch.no_grad():
        for file in _safetensors_files(Path(model_dir)):
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for tensor_name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    target = _target(tensor_name, config)
                    if target is None:
                        if not _IGNORED.fullmatch(tensor_name) and not (
                            config.tie_word_embeddings and tensor_name == "lm_head.weight"
                        ):
                            unexpected.append(tensor_name)
                        continue
                    param_name, shard = target
                    if param_name not in parameters:
                        unexpected.append(tensor_name)
                        continue
                    destination = _shard_rows(parameters[param_name], shard, config)
                    tensor = handle.get_tensor(tensor_name)
                    if tuple(tensor.shape) != tuple(destination.shape):
                        raise ValueError(
                            f"{tensor_name} in {file.name} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(destination.shape)} from config.json"
                        )
                    destination.copy_(tensor)
                    pending[param_name].discard(shard)
    missing = sorted(
        f"{name}[{shard}]" if shard else name for name, shards in pending.items() for shard in shards
    )
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {model_dir} does not match {config.architecture} with {config.num_layers} layers: "
            f"missing {missing or 'nothing'}; unexpected {sorted(unexpected) or 'nothing'}"
        )
    return model.eval(), config


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{directory} holds no *.safetensors files (pytorch .bin checkpoints are not supported)"
        )
    return files


def _target(tensor_name: str, config: ModelConfig) -> tuple[str, str] | None:
    """(parameter name, shard) for a Hugging Face tensor name; shard "" is the whole parameter."""
    if tensor_name == "model.embed_tokens.weight":
        return "embed_tokens.weight", ""
    if tensor_name == "model.norm.weight":
        return "norm.weight", ""
    if tensor_name == "lm_head.weight":
        return None if config.tie_word_embeddings else ("lm_head.weight", "")
    match = _LAYER.fullmatch(tensor_name)
    if match is None:
        return None
    layer, rest = match.groups()
    prefix = f"layers.{layer}."
    for projection in ("q", "k", "v"):
        for kind in ("weight", "bias"):
            if rest == f"self_attn.{projection}_proj.{kind}":
                return f"{prefix}self_attn.qkv_proj.{kind}", projection
    for projection in ("gate", "up"):
        for kind in ("weight", "bias"):
            if rest == f"mlp.{projection}_proj.{kind}":
                return f"{prefix}mlp.gate_up_proj.{kind}", projection
    if rest in (
        "self_attn.o_proj.weight",
        "self_attn.o_proj.bias",
        "mlp.down_proj.weight",
        "mlp.down_proj.bias",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ):
        return prefix + rest, ""
    return None


def _expected_shards(model: LlamaForCausalLM) -> dict[str, tuple[str, ...]]:
    shards: dict[str, tuple[str, ...]] = {}
    for name, _ in model.named_parameters():
        if ".qkv_proj." in name:
            shards[name] = ("q", "k", "v")
        elif ".gate_up_proj." in name:
            shards[name] = ("gate", "up")
        else:
            shards[name] = ("",)
    return shards


def _shard_rows(parameter: torch.Tensor, shard: str, config: ModelConfig) -> torch.Tensor:
    """The view of `parameter` that the checkpoint tensor for `shard` fills."""
    offsets = {
        "": (0, parameter.shape[0]),
        "q": (0, config.q_size),
        "k": (config.q_size, config.kv_size),
        "v": (config.q_size + config.kv_size, config.kv_size),
        "gate": (0, config.intermediate_size),
        "up": (config.intermediate_size, config.intermediate_size),
    }
    start, length = offsets[shard]
    return parameter.narrow(0, start, length)
