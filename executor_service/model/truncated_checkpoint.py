"""A layer-truncated copy of a checkpoint (LayerSkip-style self-speculation): the first N decoder layers,
the embeddings, the final norm and the LM head, written as a Hugging Face safetensors directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from executor_service.model.config import ModelConfig
from executor_service.model.gguf_checkpoint import GGUFCheckpoint
from executor_service.model.llama import LlamaForCausalLM
from executor_service.model.loader import HF_LAYER_TENSOR, safetensors_files
from executor_service.ops import create_ops_backend
from shared.model_path import find_gguf_file

# Files of a Hugging Face checkpoint directory copied unchanged beside the truncated weights.
COPIED_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)  # fmt: skip
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def write_truncated_checkpoint(source: str | Path, output_dir: str | Path, num_layers: int) -> Path:
    """Writes the first `num_layers` decoder layers of the checkpoint at `source` (a Hugging Face
    safetensors directory, or a GGUF file / directory holding one, dequantized to float32) into
    `output_dir` as config.json (num_hidden_layers = `num_layers`) plus model.safetensors, with the
    tokenizer and generation files of a Hugging Face source copied. Returns `output_dir`'s path.

    Layer i of the copy is layer i of the source, bit for bit (GGUF: its dequantized values, with the
    Q/K rows put back in Hugging Face order), so the copy computes exactly what the source's first
    layers followed by its final norm and LM head compute. Raises ValueError for a layer count out of
    range or a source pagewire cannot read.
    """
    output_path = Path(output_dir)
    gguf_file = find_gguf_file(source)
    if gguf_file is not None:
        config_json, tensors = _from_gguf(gguf_file, num_layers)
    else:
        config_json, tensors = _from_safetensors(Path(source), num_layers)
    if output_path.resolve() == Path(source).resolve():
        raise ValueError(f"write the draft model into another directory than its source {source}")
    output_path.mkdir(parents=True, exist_ok=True)
    (output_path / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(output_path / "model.safetensors"),
              metadata={"format": "pt"})
    if gguf_file is None:
        for name in COPIED_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, output_path / name)
    return output_path


def _check_num_layers(num_layers: int, available: int, source: object) -> None:
    if not 1 <= num_layers <= available:
        raise ValueError(f"--num-layers must be in 1..{available} (the layers of {source}), got {num_layers}")


def _from_safetensors(directory: Path, num_layers: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = ModelConfig.from_pretrained_dir(directory)  # checks the architecture is one pagewire serves
    _check_num_layers(num_layers, config.num_layers, directory)
    raw = json.loads((directory / "config.json").read_text())
    raw["num_hidden_layers"] = num_layers
    if isinstance(raw.get("layer_types"), list):
        raw["layer_types"] = raw["layer_types"][:num_layers]
    if isinstance(raw.get("max_window_layers"), int):
        raw["max_window_layers"] = min(raw["max_window_layers"], num_layers)
    tensors: dict[str, torch.Tensor] = {}
    for file in safetensors_files(directory):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                match = HF_LAYER_TENSOR.fullmatch(name)
                if match is None or int(match.group(1)) < num_layers:
                    tensors[name] = handle.get_tensor(name)
    return raw, tensors


def _from_gguf(file: Path, num_layers: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    checkpoint = GGUFCheckpoint.open(file)
    config = checkpoint.config
    _check_num_layers(num_layers, config.num_layers, file)
    model = checkpoint.load(torch.float32, torch.device("cpu"), create_ops_backend("torch", "cpu"))
    return hf_config_json(config, num_layers), hf_tensors(model, num_layers)


def hf_config_json(config: ModelConfig, num_layers: int) -> dict[str, Any]:
    """config.json for transformers of `config` cut to `num_layers` layers, float32 weights."""
    eos = list(config.eos_token_ids)
    return {
        "architectures": [config.architecture],
        "model_type": _MODEL_TYPES[config.architecture],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "attention_bias": config.qkv_bias,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_word_embeddings,
        "sliding_window": config.sliding_window,
        "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
        "torch_dtype": "float32",
    }


def hf_tensors(model: LlamaForCausalLM, num_layers: int) -> dict[str, torch.Tensor]:
    """The model's first `num_layers` layers, embeddings, final norm and LM head under Hugging Face
    names, q/k/v and gate/up split back out of their fused parameters."""
    config = model.config
    splits = {
        "self_attn.qkv_proj": (("q_proj", config.q_size), ("k_proj", config.kv_size), ("v_proj", config.kv_size)),
        "mlp.gate_up_proj": (("gate_proj", config.intermediate_size), ("up_proj", config.intermediate_size)),
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, parameter in model.named_parameters():
        value = parameter.detach().cpu()
        if not name.startswith("layers."):
            tensors["lm_head.weight" if name == "lm_head.weight" else f"model.{name}"] = value.clone()
            continue
        layer = int(name.split(".")[1])
        if layer >= num_layers:
            continue
        module, kind = name.rsplit(".", 1)
        fused = next((key for key in splits if module.endswith(key)), None)
        if fused is None:
            tensors[f"model.{name}"] = value.clone()
            continue
        prefix = module.removesuffix(fused)
        parent = fused.split(".")[0]
        start = 0
        for leaf, rows in splits[fused]:
            tensors[f"model.{prefix}{parent}.{leaf}.{kind}"] = value[start : start + rows].clone()
            start += rows
    return tensors
