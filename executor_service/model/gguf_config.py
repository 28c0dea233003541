"""The `ModelConfig` of a GGUF file, read from the metadata keys llama.cpp's converter writes."""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader

from executor_service.model.config import ModelConfig
from executor_service.model.rope import rope_inverse_frequencies

# GGUF `general.architecture` -> the Hugging Face architecture it serves as.
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_FREQS_TENSOR = "rope_freqs.weight"
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: "float32",
    GGMLQuantizationType.F16: "float16",
    GGMLQuantizationType.BF16: "bfloat16",
}
# Llama 3.1/3.2's published rope_scaling besides `factor`: the only variant a rope_freqs tensor is read as.
_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """The metadata value under `key` (a scalar, a string or a list), or `default` when absent."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def model_config_from_gguf(reader: GGUFReader, name: str) -> ModelConfig:
    """The decoder's shape and numerics from a GGUF file's metadata and tensor list.

    Tied embeddings when the file has no `output.weight` (as transformers decides); EOS from
    `tokenizer.ggml.eos_token_id`; `torch_dtype` is the file's float type when no tensor is quantized,
    else None (the serving default). Raises ValueError for an architecture other than llama / qwen2
    or a RoPE scaling pagewire does not implement.
    """
    arch = field_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}: "
            f"pagewire serves {', '.join(GGUF_ARCHITECTURES)} GGUF files"
        )

    def required(key: str) -> Any:
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF file {name!r} has no {arch}.{key} in its metadata")
        return value

    tensor_names = {tensor.name for tensor in reader.tensors}
    hidden_size = int(required("embedding_length"))
    num_heads = int(required("attention.head_count"))
    # llama.cpp rotates whole heads in Llama files, so its RoPE width is the head size there.
    head_dim = int(
        field_value(reader, f"{arch}.attention.key_length", 0)
        or (arch == "llama" and field_value(reader, f"{arch}.rope.dimension_count", 0))
        or hidden_size // num_heads
    )
    rope_theta = float(field_value(reader, f"{arch}.rope.freq_base", 10000.0))
    vocab_size = field_value(reader, f"{arch}.vocab_size")
    if vocab_size is None:
        vocab_size = len(field_value(reader, "tokenizer.ggml.tokens", []))
    eos_token_id = field_value(reader, "tokenizer.ggml.eos_token_id")
    is_qwen2 = arch == "qwen2"
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        hidden_size=hidden_size,
        intermediate_size=int(required("feed_forward_length")),
        num_layers=int(required("block_count")),
        num_attention_heads=num_heads,
        num_kv_heads=int(field_value(reader, f"{arch}.attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        vocab_size=int(vocab_size),
        max_position_embeddings=int(field_value(reader, f"{arch}.context_length", 2048)),
        rms_norm_eps=float(field_value(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(reader, arch, head_dim, rope_theta),
        qkv_bias=is_qwen2 or "blk.0.attn_q.bias" in tensor_names,
        o_proj_bias="blk.0.attn_output.bias" in tensor_names,
        mlp_bias="blk.0.ffn_down.bias" in tensor_names,
        tie_word_embeddings="output.weight" not in tensor_names,
        eos_token_ids=() if eos_token_id is None else (int(eos_token_id),),
        torch_dtype=_float_type(reader),
        sliding_window=None,
        name=name,
    )


def _float_type(reader: GGUFReader) -> str | None:
    """The file's float type when it holds no quantized tensor (norms are F32 beside F16/BF16 weights)."""
    types = {tensor.tensor_type for tensor in reader.tensors}
    if not types <= set(_FLOAT_TYPES):
        return None
    for half in (GGMLQuantizationType.BF16, GGMLQuantizationType.F16):
        if half in types:
            return _FLOAT_TYPES[half]
    return "float32"


def _rope_scaling(reader: GGUFReader, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    """`rope.scaling.*` keys (linear), or Llama 3's scaling recognised from its `rope_freqs` tensor."""
    scaling_type = field_value(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(field_value(reader, f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if scaling_type == "linear" and factor != 1.0:
        return {"rope_type": "linear", "factor": factor}
    if scaling_type not in ("none", "linear"):
        raise ValueError(
            f"unsupported GGUF rope scaling {scaling_type!r}: pagewire supports linear and llama3"
        )
    rope_freqs = next((tensor for tensor in reader.tensors if tensor.name == ROPE_FREQS_TENSOR), None)
    if rope_freqs is None:
        return None
    return _llama3_scaling(np.asarray(rope_freqs.data, dtype=np.float32).reshape(-1), head_dim, theta)


def _llama3_scaling(frequency_factors: np.ndarray, head_dim: int, theta: float) -> dict[str, Any]:
    """The llama3 rope_scaling whose per-frequency divisors equal the file's `rope_freqs` tensor.

    llama.cpp stores Llama 3.1's scaling as that tensor rather than as parameters; pagewire accepts it
    when Llama 3's published parameters reproduce it, and says so otherwise.
    """
    scaling = {"rope_type": "llama3", "factor": float(frequency_factors.max()), **_LLAMA3_SCALING}
    base = rope_inverse_frequencies(head_dim, theta, None).numpy()
    scaled = rope_inverse_frequencies(head_dim, theta, scaling).numpy()
    if frequency_factors.shape != base.shape or not np.allclose(base / scaled, frequency_factors, rtol=1e-3):
        raise ValueError(
            f"the GGUF file's {ROPE_FREQS_TENSOR} does not match Llama 3's rope scaling "
            f"(factor {scaling['factor']:g}, {_LLAMA3_SCALING}); other frequency factors are not supported"
        )
    return scaling
