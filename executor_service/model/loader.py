"""Opens a model checkpoint (a Hugging Face safetensors directory or a GGUF file) and loads it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from executor_service.model.config import ModelConfig
from executor_service.model.gguf_checkpoint import GGUFCheckpoint
from executor_service.model.llama import LlamaForCausalLM
from executor_service.model.parameter_shards import expected_shards, missing_shards, shard_rows
from executor_service.ops.base import OpsBackend
from shared.model_path import find_gguf_file

# Checkpoint tensors that carry no weights of ours (old Llama exports saved the RoPE table).
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
HF_LAYER_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)")


class SafetensorsCheckpoint:
    """A Hugging Face checkpoint directory: config.json plus safetensors files."""

    def __init__(self, path: Path, config: ModelConfig) -> None:
        self.path = path
        self.config = config

    @classmethod
    def open(cls, path: str | Path) -> SafetensorsCheckpoint:
        directory = Path(path).resolve()
        return cls(directory, ModelConfig.from_pretrained_dir(directory))

    def load(self, dtype: torch.dtype, device: torch.device, ops: OpsBackend) -> LlamaForCausalLM:
        """The model filled from the safetensors files, cast to `dtype` on `device`.

        Every parameter must be covered by the checkpoint and every checkpoint tensor must map to a
        parameter (a tied model may carry a redundant `lm_head.weight`); otherwise `ValueError` names
        the missing or unexpected tensors.
        """
        config = self.config
        model = LlamaForCausalLM(config, ops, dtype=dtype, device=device)
        parameters = dict(model.named_parameters())
        # Each parameter is made of row shards; all of them must arrive exactly once.
        pending = {name: set(shards) for name, shards in expected_shards(model).items()}
        unexpected: list[str] = []
        with torch.no_grad():
            for file in safetensors_files(self.path):
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
                        destination = shard_rows(parameters[param_name], shard, config)
                        tensor = handle.get_tensor(tensor_name)
                        if tuple(tensor.shape) != tuple(destination.shape):
                            raise ValueError(
                                f"{tensor_name} in {file.name} has shape {tuple(tensor.shape)}, "
                                f"expected {tuple(destination.shape)} from config.json"
                            )
                        destination.copy_(tensor)
                        pending[param_name].discard(shard)
        missing = missing_shards(pending)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {self.path} does not match {config.architecture} "
                f"with {config.num_layers} layers: "
                f"missing {missing or 'nothing'}; unexpected {sorted(unexpected) or 'nothing'}"
            )
        return model.eval()


Checkpoint = SafetensorsCheckpoint | GGUFCheckpoint


def open_checkpoint(model_path: str | Path) -> Checkpoint:
    """The checkpoint at `model_path`: a `.gguf` file or a directory holding one (GGUF), else a
    Hugging Face directory with config.json. Reads the metadata only; `load` reads the weights."""
    gguf_file = find_gguf_file(model_path)
    if gguf_file is not None:
        return GGUFCheckpoint.open(gguf_file)
    return SafetensorsCheckpoint.open(model_path)


def load_model(
    model_path: str | Path, dtype: torch.dtype, device: torch.device, ops: OpsBackend
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Opens the checkpoint at `model_path` and loads it in `dtype` on `device`."""
    checkpoint = open_checkpoint(model_path)
    return checkpoint.load(dtype, device, ops), checkpoint.config


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (those its index names, else every one)."""
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
    match = HF_LAYER_TENSOR.fullmatch(tensor_name)
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
