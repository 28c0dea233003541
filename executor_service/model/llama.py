"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2) over the flattened varlen batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from executor_service.attention_metadata import AttentionMetadata
from executor_service.lora.lora_batch import LoraBatch
from executor_service.model.config import ModelConfig
from executor_service.model.invariant_linear import (
    invariant_linear,
    pack_weight,
    silu_gate_times_up,
    uses_onednn,
)
from executor_service.model.rope import RotaryEmbedding
from executor_service.ops.base import OpsBackend


def _empty_parameter(*shape: int, dtype: torch.dtype, device: torch.device | str | None) -> nn.Parameter:
    # Left uninitialised: the loader overwrites every parameter, and random init of a large model is slow.
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """`y = x W^T (+ b) (+ residual)` with an uninitialised weight `[out_features, in_features]`; rows
    are computed independently of each other (`invariant_linear`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.weight = _empty_parameter(out_features, in_features, dtype=dtype, device=device)
        self.bias = _empty_parameter(out_features, dtype=dtype, device=device) if bias else None
        self._packed = PackedWeight()

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return invariant_linear(x, self.weight, self.bias, self._packed.get(self.weight), residual)


class PackedWeight:
    """A weight's (or a block of its rows') oneDNN-packed copy, made on first use and remade whenever
    the weight is written."""

    def __init__(self, rows: slice | None = None) -> None:
        self._rows = rows
        self._key: tuple[int, int] | None = None
        self._packed: torch.Tensor | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor | None:
        if not uses_onednn(weight):
            return None
        key = (weight.data_ptr(), weight._version)
        if key != self._key:
            source = weight if self._rows is None else weight[self._rows]
            self._packed, self._key = pack_weight(source), key
        return self._packed


class Embedding(nn.Module):
    """Token id -> row of an uninitialised `[vocab_size, hidden_size]` table."""

    def __init__(
        self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device: torch.device | str | None
    ) -> None:
        super().__init__()
        self.weight = _empty_parameter(vocab_size, hidden_size, dtype=dtype, device=device)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, as Hugging Face Llama does (`OpsBackend.rms_norm`)."""

    def __init__(
        self,
        hidden_size: int,
        eps: float,
        ops: OpsBackend,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.weight = _empty_parameter(hidden_size, dtype=dtype, device=device)
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """Fused qkv projection, RoPE, K/V written to the paged cache, paged attention, output projection."""

    def __init__(
        self,
        config: ModelConfig,
        ops: OpsBackend,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        device: torch.device | str | None,
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = config.head_dim**-0.5
        self.ops = ops
        self.rotary = rotary
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, config.qkv_bias, dtype, device
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, config.o_proj_bias, dtype, device)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        lora: LoraBatch | None = None,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The attention block's output `[T, hidden]`, plus `residual` when given (added inside the
        output projection's matmul)."""
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if lora is not None:
            # The views write through into the fused output: each delta lands in its column slice.
            for module, out in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                lora.add_delta(self.layer_index, module, hidden, out)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k, self.ops)
        key_cache, value_cache = kv_cache
        self.ops.write_kv(k, v, key_cache, value_cache, metadata.slot_mapping)
        out = self.ops.paged_attention(q, key_cache, value_cache, metadata, self.scale).reshape(
            num_tokens, self.q_size
        )
        projected = self.o_proj(out, residual)
        if lora is not None:
            lora.add_delta(self.layer_index, "o_proj", out, projected)
        return projected


class MLP(nn.Module):
    """SwiGLU with the gate and up projections in one weight; without LoRA (whose deltas land between
    the projections and the activation) and without bias, the activation and the product run as
    post-ops of the two projections' matmuls (`silu_gate_times_up`)."""

    def __init__(
        self, config: ModelConfig, dtype: torch.dtype, device: torch.device | str | None, layer_index: int = 0
    ) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(
            config.hidden_size, 2 * config.intermediate_size, config.mlp_bias, dtype, device
        )
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias, dtype, device)
        self._packed_gate = PackedWeight(slice(0, config.intermediate_size))
        self._packed_up = PackedWeight(slice(config.intermediate_size, None))

    def forward(
        self, x: torch.Tensor, lora: LoraBatch | None = None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The MLP's output, plus `residual` when given (added inside the down projection's matmul)."""
        if lora is None and self.gate_up_proj.bias is None:
            weight = self.gate_up_proj.weight
            inner = silu_gate_times_up(x, weight, self._packed_gate.get(weight), self._packed_up.get(weight))
        else:
            gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
            if lora is not None:
                lora.add_delta(self.layer_index, "gate_proj", x, gate)
                lora.add_delta(self.layer_index, "up_proj", x, up)
            inner = F.silu(gate) * up
        out = self.down_proj(inner, residual)
        if lora is not None:
            lora.add_delta(self.layer_index, "down_proj", inner, out)
        return out


class DecoderLayer(nn.Module):
    """Pre-norm attention, then pre-norm SwiGLU MLP, each added back to the residual stream."""

    def __init__(
        self,
        config: ModelConfig,
        ops: OpsBackend,
        rotary: RotaryEmbedding,
        dtype: torch.dtype,
        device: torch.device | str | None,
        layer_index: int = 0,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, device)
        self.self_attn = Attention(config, ops, rotary, dtype, device, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, device)
        self.mlp = MLP(config, dtype, device, layer_index)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        hidden = self.self_attn(self.input_layernorm(hidden), positions, kv_cache, metadata, lora, hidden)
        return self.mlp(self.post_attention_layernorm(hidden), lora, hidden)


class LlamaForCausalLM(nn.Module):
    """A Llama-family decoder whose attention reads and writes a paged KV cache through `ops`.

    Parameters are created uninitialised in `dtype` on `device`; `load_model` fills them. Parameter
    names (`layers.{i}.self_attn.qkv_proj.weight`, ...) are the Hugging Face names without the
    `model.` prefix, with q/k/v and gate/up fused. `rope` is shared by all layers.
    """

    def __init__(
        self,
        config: ModelConfig,
        ops: OpsBackend,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.rope = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, device
        )
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, ops, self.rope, dtype, device, i) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops, dtype, device)
        self._packed_lm_head = PackedWeight()
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, False, dtype, device)
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        metadata: AttentionMetadata,
        lora: LoraBatch | None = None,
    ) -> torch.Tensor:
        """Hidden states `[T, hidden]` after the final norm for the `T` scheduled tokens.

        `kv_caches[i]` is layer i's (key_cache, value_cache); this step's K/V are written into them.
        `lora`, when given, adds its adapters' deltas to the rows of its segments (None: base model).
        """
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for a model with {len(self.layers)} layers")
        hidden = self.embed_tokens(input_ids)
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden = layer(hidden, positions, kv_cache, metadata, lora)
        return self.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits `[N, vocab]` for hidden states `[N, hidden]` (the rows to sample from)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return invariant_linear(hidden, weight, None, self._packed_lm_head.get(weight)).float()
