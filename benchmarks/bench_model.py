"""The comparison's model: a fixed-shape Llama checkpoint with random weights from a seed, and its FLOPs."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from executor_service.tiny_model import LM_HEAD_GAIN
from executor_service.tiny_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, write_tiny_tokenizer


@dataclass(frozen=True, slots=True)
class BenchModelConfig:
    """The shape of the benchmark Llama; the defaults are the issue's fixed 8-layer model (fp32)."""

    num_layers: int = 8
    hidden_size: int = 512
    num_attention_heads: int = 8
    num_kv_heads: int = 4
    intermediate_size: int = 1408
    vocab_size: int = 32000
    max_position_embeddings: int = 2048

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} must divide by num_attention_heads "
                f"{self.num_attention_heads}, which must divide by num_kv_heads {self.num_kv_heads}"
            )
        if self.vocab_size <= EOS_TOKEN_ID:
            raise ValueError(f"vocab_size must exceed the tokenizer's special ids (> {EOS_TOKEN_ID})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_layer_params(self) -> int:
        """Matmul weights of one decoder layer (norms are negligible and not counted)."""
        hidden, kv_size = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * hidden * hidden + 2 * hidden * kv_size
        return attention + 3 * hidden * self.intermediate_size

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers, fp32."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 4

    def body_flops_per_token(self, context_len: int) -> float:
        """Multiply-adds x 2 of one token through every decoder layer, attending to `context_len` keys."""
        attention = 4 * self.num_attention_heads * self.head_dim * context_len
        return self.num_layers * (2 * self.num_layer_params + attention)

    @property
    def lm_head_flops(self) -> float:
        return 2 * self.hidden_size * self.vocab_size

    def request_flops(self, num_prompt_tokens: int, num_output_tokens: int) -> float:
        """Useful FLOPs of one request: every prompt token and every fed-back output token through the
        body (the last sampled token is never fed back), one LM head per output token. Padding and
        recomputation are not useful work and are not counted."""
        num_body_tokens = num_prompt_tokens + max(num_output_tokens - 1, 0)
        # Token at position p attends to p + 1 keys; sum over positions 0..n-1 is n(n+1)/2.
        attention_keys = num_body_tokens * (num_body_tokens + 1) // 2
        body = num_body_tokens * self.body_flops_per_token(0)
        body += self.num_layers * 4 * self.num_attention_heads * self.head_dim * attention_keys
        return body + num_output_tokens * self.lm_head_flops


def _hf_config(config: BenchModelConfig) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
    }


def _random_weights(config: BenchModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """HF Llama tensors drawn in a fixed order from `seed`: projections ~N(0, 1/fan_in), norms 1."""
    generator = torch.Generator().manual_seed(seed)
    hidden, kv_size = config.hidden_size, config.num_kv_heads * config.head_dim

    def normal(shape: tuple[int, int], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    def projection(out_features: int, in_features: int) -> torch.Tensor:
        return normal((out_features, in_features), 1.0 / math.sqrt(in_features))

    weights = {"model.embed_tokens.weight": normal((config.vocab_size, hidden), 1.0)}
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        weights[f"{prefix}.input_layernorm.weight"] = torch.ones(hidden)
        weights[f"{prefix}.self_attn.q_proj.weight"] = projection(hidden, hidden)
        weights[f"{prefix}.self_attn.k_proj.weight"] = projection(kv_size, hidden)
        weights[f"{prefix}.self_attn.v_proj.weight"] = projection(kv_size, hidden)
        weights[f"{prefix}.self_attn.o_proj.weight"] = projection(hidden, hidden)
        weights[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(hidden)
        weights[f"{prefix}.mlp.gate_proj.weight"] = projection(config.intermediate_size, hidden)
        weights[f"{prefix}.mlp.up_proj.weight"] = projection(config.intermediate_size, hidden)
        weights[f"{prefix}.mlp.down_proj.weight"] = projection(hidden, config.intermediate_size)
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = normal((config.vocab_size, hidden), LM_HEAD_GAIN / math.sqrt(hidden))
    return weights


def create_bench_model(output_dir: str | Path, config: BenchModelConfig, seed: int = 0) -> Path:
    """Writes config.json, generation_config.json, model.safetensors and the tiny byte tokenizer.

    The tokenizer knows 260 ids while the model has `vocab_size`: benchmark prompts are token ids, and
    ids the tokenizer does not know decode to no text (the server streams them all the same).
    """
    path = Path(output_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(_hf_config(config), indent=2, sort_keys=True) + "\n")
    generation = {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(_random_weights(config, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    write_tiny_tokenizer(path)
    return path


def describe(config: BenchModelConfig) -> dict[str, object]:
    """The config as plain data, with the derived figures a results file reports."""
    return {
        **asdict(config),
        "head_dim": config.head_dim,
        "dtype": "float32",
        "num_params": config.num_layers * config.num_layer_params
        + 2 * config.vocab_size * config.hidden_size,
        "flops_per_output_token_at_context_0": config.body_flops_per_token(0) + config.lm_head_flops,
        "kv_bytes_per_token": config.kv_bytes_per_token,
    }
