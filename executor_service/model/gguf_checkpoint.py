"""A Llama-family GGUF file (llama.cpp's format) loaded into `LlamaForCausalLM`, dequantized at load."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize

from executor_service.model.config import ModelConfig
from executor_service.model.gguf_config import ROPE_FREQS_TENSOR, model_config_from_gguf
from executor_service.model.llama import LlamaForCausalLM
from executor_service.model.parameter_shards import expected_shards, missing_shards, shard_rows
from executor_service.ops.base import OpsBackend

SUPPORTED_TENSOR_TYPES = tuple(
    GGMLQuantizationType[name]
    for name in (
        "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    )
)  # fmt: skip
_LAYER = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp leaf name -> (our parameter inside `layers.N.`, shard).
_LAYER_TENSORS = {
    "attn_q": ("self_attn.qkv_proj", "q"),
    "attn_k": ("self_attn.qkv_proj", "k"),
    "attn_v": ("self_attn.qkv_proj", "v"),
    "attn_output": ("self_attn.o_proj", ""),
    "ffn_gate": ("mlp.gate_up_proj", "gate"),
    "ffn_up": ("mlp.gate_up_proj", "up"),
    "ffn_down": ("mlp.down_proj", ""),
    "attn_norm": ("input_layernorm", ""),
    "ffn_norm": ("post_attention_layernorm", ""),
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFCheckpoint:
    """One opened GGUF file: its `ModelConfig` from the metadata, and its tensors to load.

    The file is memory-mapped; tensors are read and dequantized one at a time by `load`.
    """

    def __init__(self, path: Path, reader: GGUFReader, config: ModelConfig) -> None:
        self.path = path
        self.reader = reader
        self.config = config

    @classmethod
    def open(cls, path: str | Path) -> GGUFCheckpoint:
        """Reads the metadata of the GGUF file at `path`; ValueError when pagewire cannot serve it."""
        file = Path(path)
        try:
            reader = GGUFReader(file)
        except (ValueError, OSError) as error:
            raise ValueError(f"cannot read {file} as a GGUF file: {error}") from error
        name = file.name[: -len(".gguf")] if file.name.lower().endswith(".gguf") else file.name
        return cls(file, reader, model_config_from_gguf(reader, name))

    def load(self, dtype: torch.dtype, device: torch.device, ops: OpsBackend) -> LlamaForCausalLM:
        """The model with every parameter filled from the file, in `dtype` on `device`.

        Quantized tensors are dequantized with gguf-py (float32) and then cast, as transformers does.
        Q and K rows are put back from llama.cpp's interleaved RoPE order into Hugging Face's halves
        order (llama files only; llama.cpp does not permute qwen2). Raises ValueError naming the tensor
        for an unsupported tensor type, a wrong shape, a missing parameter or an unexpected tensor.
        """
        config = self.config
        model = LlamaForCausalLM(config, ops, dtype=dtype, device=device)
        parameters = dict(model.named_parameters())
        pending = {name: set(shards) for name, shards in expected_shards(model).items()}
        unexpected: list[str] = []
        permutes_qk = config.architecture == "LlamaForCausalLM"
        with torch.no_grad():
            for tensor in self.reader.tensors:
                if tensor.name == ROPE_FREQS_TENSOR:
                    continue  # read into config.rope_scaling already
                target = gguf_target(tensor.name)
                if target is None or target[0] not in parameters:
                    unexpected.append(tensor.name)
                    continue
                param_name, shard = target
                destination = shard_rows(parameters[param_name], shard, config)
                weights = dequantize_tensor(tensor)
                if tuple(weights.shape) != tuple(destination.shape):
                    raise ValueError(
                        f"GGUF tensor {tensor.name} in {self.path.name} has shape {tuple(weights.shape)}, "
                        f"expected {tuple(destination.shape)} from the file's metadata"
                    )
                if permutes_qk and shard in ("q", "k"):
                    num_heads = config.num_attention_heads if shard == "q" else config.num_kv_heads
                    weights = unpermute_rope_rows(weights, num_heads)
                destination.copy_(weights)
                pending[param_name].discard(shard)
        missing = missing_shards(pending)
        if missing or unexpected:
            raise ValueError(
                f"GGUF file {self.path} does not match {config.architecture} "
                f"with {config.num_layers} layers: "
                f"missing {missing or 'nothing'}; unexpected {sorted(unexpected) or 'nothing'}"
            )
        return model.eval()


def gguf_target(tensor_name: str) -> tuple[str, str] | None:
    """(our parameter name, shard) for a llama.cpp tensor name; shard "" is the whole parameter."""
    if tensor_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[tensor_name], ""
    match = _LAYER.fullmatch(tensor_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        return None
    layer, leaf, kind = match.groups()
    module, shard = _LAYER_TENSORS[leaf]
    return f"layers.{layer}.{module}.{kind}", shard


def dequantize_tensor(tensor: ReaderTensor) -> torch.Tensor:
    """The tensor's values as float32 in torch's dimension order; ValueError for an unsupported type."""
    if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
        supported = ", ".join(kind.name for kind in SUPPORTED_TENSOR_TYPES)
        raise ValueError(
            f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which pagewire cannot dequantize "
            f"(supported: {supported})"
        )
    values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(size) for size in reversed(tensor.shape))  # ggml lists the fastest dimension first
    if not values.flags.writeable:  # F32 comes back as a view of the read-only file mapping
        values = values.copy()
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))


def unpermute_rope_rows(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... of each head, so its converter reorders
    each head's rows from Hugging Face's halves layout [first half | second half] into interleaved
    pairs; this is the inverse, the one transformers' GGUF loader applies. Works on weights and biases.
    """
    rows = weights.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {num_heads} heads of even size")
    half_head = rows // num_heads // 2
    tail = weights.shape[1:]
    return weights.reshape(num_heads, half_head, 2, *tail).transpose(1, 2).reshape(weights.shape)
