"""A tiny random Llama checkpoint (HF layout, byte-level tokenizer) created offline from a seed."""

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from executor_service.tiny_tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, TINY_VOCAB_SIZE, write_tiny_tokenizer

# Logits are lm_head(final RMSNorm output): with unit-RMS inputs and weights ~N(0, gain^2 / hidden_size)
# their std is about `gain`. A std of ~6 puts the median gap between the two best logits near 1.4, so
# greedy decoding compared token for token across implementations practically never meets a near-tie.
LM_HEAD_GAIN = 6.0


@dataclass(frozen=True, slots=True)
class TinyModelConfig:
    """The shape of the tiny Llama; the vocabulary always comes from the tiny tokenizer."""

    hidden_size: int = 64
    intermediate_size: int = 176
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        sizes = (self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                 self.num_attention_heads, self.num_key_value_heads, self.max_position_embeddings)
        if min(sizes) < 1:
            raise ValueError(f"every size of the tiny model must be positive, got {self}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} must be a multiple of num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def with_hidden_size(self, hidden_size: int) -> "TinyModelConfig":
        """This config at another width with the default's MLP ratio (intermediate = 2.75 x hidden)."""
        return dataclasses.replace(self, hidden_size=hidden_size, intermediate_size=hidden_size * 11 // 4)


def _hf_config(config: TinyModelConfig) -> dict[str, object]:
    """config.json for transformers' LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": TINY_VOCAB_SIZE,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
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


def _generation_config() -> dict[str, object]:
    return {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID}


def _weight_shapes(config: TinyModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama parameter names and shapes ([out, in] for projections), in the order they are drawn."""
    hidden = config.hidden_size
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (TINY_VOCAB_SIZE, hidden))]
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        shapes += [
            (f"{prefix}.input_layernorm.weight", (hidden,)),
            (f"{prefix}.self_attn.q_proj.weight", (q_size, hidden)),
            (f"{prefix}.self_attn.k_proj.weight", (kv_size, hidden)),
            (f"{prefix}.self_attn.v_proj.weight", (kv_size, hidden)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden, q_size)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
            (f"{prefix}.mlp.gate_proj.weight", (config.intermediate_size, hidden)),
            (f"{prefix}.mlp.up_proj.weight", (config.intermediate_size, hidden)),
            (f"{prefix}.mlp.down_proj.weight", (hidden, config.intermediate_size)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (TINY_VOCAB_SIZE, hidden))]
    return shapes


def random_tiny_weights(config: TinyModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights drawn in a fixed order from a generator seeded by `seed` (same seed, same tensors).

    Embeddings ~N(0, 1) and projections ~N(0, 1/fan_in) keep every residual contribution near unit
    scale, so attention matters as much as the token itself; norms are 1; see LM_HEAD_GAIN for lm_head.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    weights: dict[str, torch.Tensor] = {}
    for name, shape in _weight_shapes(config):
        if len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=torch.float32)
            continue
        if name == "model.embed_tokens.weight":
            std = 1.0
        elif name == "lm_head.weight":
            std = LM_HEAD_GAIN / math.sqrt(shape[1])
        else:
            std = 1.0 / math.sqrt(shape[1])
        weights[name] = torch.randn(shape, generator=generator, dtype=torch.float32) * std
    return weights


def _write_json(path: Path, content: dict[str, object]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def create_tiny_model(output_dir: str | Path, seed: int = 0, config: TinyModelConfig | None = None) -> Path:
    """Writes a loadable HF Llama checkpoint into `output_dir` (created if missing) and returns its path.

    Files: config.json, generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
    special_tokens_map.json. Same (seed, config) gives byte-identical files; needs no network.
    """
    config = config or TinyModelConfig()
    output_path = Path(output_dir)
    output_path.mkdir(parents=True, exist_ok=True)
    _write_json(output_path / "config.json", _hf_config(config))
    _write_json(output_path / "generation_config.json", _generation_config())
    weights = random_tiny_weights(config, seed)
    save_file(weights, str(output_path / "model.safetensors"), metadata={"format": "pt"})
    write_tiny_tokenizer(output_path)
    return output_path


def add_create_tiny_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `pagewire create-tiny-model DIR [--seed S] [--layers N] [--hidden-size H]`."""
    defaults = TinyModelConfig()
    parser.add_argument("output_dir", type=Path, help="directory to write the checkpoint into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    parser.add_argument(
        "--layers", type=int, default=defaults.num_hidden_layers,
        help=f"number of decoder layers (default: {defaults.num_hidden_layers})",
    )
    parser.add_argument(
        "--hidden-size", type=int, default=defaults.hidden_size,
        help=f"hidden size; the MLP is 2.75x wider (default: {defaults.hidden_size})",
    )


def run_create_tiny_model(args: argparse.Namespace) -> int:
    """Creates the checkpoint described by `args`, prints its path and returns the exit status."""
    config = dataclasses.replace(TinyModelConfig(), num_hidden_layers=args.layers)
    if args.hidden_size != config.hidden_size:
        config = config.with_hidden_size(args.hidden_size)
    output_path = create_tiny_model(args.output_dir, seed=args.seed, config=config)
    print(output_path)
    return 0
