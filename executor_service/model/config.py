"""The model hyper-parameters pagewire needs, read from a Hugging Face checkpoint directory."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One Llama-family decoder's shape and numerics.

    `rope_scaling` is None for plain RoPE, else a dict with at least `rope_type` ("linear" or
    "llama3") and that type's parameters. `sliding_window` is None when every layer attends to the
    whole context.
    """

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    sliding_window: int | None
    hidden_act: str = "silu"
    # The checkpoint directory's base name, for humans.
    name: str = ""

    @property
    def max_model_len(self) -> int:
        """The longest sequence served exactly: attention here spans the whole context, so a model with
        a sliding window is capped at the window (beyond it, its outputs would differ from the reference)."""
        if self.sliding_window is None:
            return self.max_position_embeddings
        return min(self.max_position_embeddings, self.sliding_window)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained_dir(cls, path: str | Path) -> ModelConfig:
        """Reads `config.json` (and `generation_config.json` for extra eos ids) under `path`."""
        directory = Path(path)
        config_path = directory / "config.json"
        if not config_path.is_file():
            raise ValueError(f"{directory} has no config.json: pass a Hugging Face checkpoint directory")
        raw = json.loads(config_path.read_text())
        generation_path = directory / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        return dataclasses.replace(cls.from_dict(raw, generation), name=directory.resolve().name)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        """Builds the config from parsed `config.json` (and optional `generation_config.json`) contents."""
        architectures = raw.get("architectures") or []
        architecture = next((name for name in architectures if name in SUPPORTED_ARCHITECTURES), None)
        if architecture is None:
            raise ValueError(
                f"unsupported model architecture {architectures or raw.get('model_type')!r}: "
                f"pagewire supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden_act = raw.get("hidden_act", "silu")
        if hidden_act != "silu":
            raise ValueError(f"unsupported hidden_act {hidden_act!r}: the Llama-family model uses silu")
        num_heads = int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim") or int(raw["hidden_size"]) // num_heads
        rope_theta, rope_scaling = _rope_settings(raw)
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=architecture,
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            vocab_size=int(raw["vocab_size"]),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            qkv_bias=True if is_qwen2 else attention_bias,
            o_proj_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_ids=_merge_ids(raw.get("eos_token_id"), (generation or {}).get("eos_token_id")),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            sliding_window=_sliding_window(raw, is_qwen2),
            hidden_act=hidden_act,
        )


def _rope_settings(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from either `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling`."""
    parameters = dict(raw.get("rope_parameters") or {})
    legacy_scaling = dict(raw.get("rope_scaling") or {})
    theta = float(parameters.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = parameters or legacy_scaling
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("rope_theta", None)
    if scaling.get("rope_type", "default") == "default":
        return theta, None
    return theta, scaling


def _sliding_window(raw: dict[str, Any], is_qwen2: bool) -> int | None:
    window = raw.get("sliding_window")
    if window is None or (is_qwen2 and not raw.get("use_sliding_window", False)):
        return None
    return int(window)


def _merge_ids(*values: int | list[int] | None) -> tuple[int, ...]:
    merged: list[int] = []
    for value in values:
        for token_id in [value] if isinstance(value, int) else (value or []):
            if token_id not in merged:
                merged.append(int(token_id))
    return tuple(merged)
