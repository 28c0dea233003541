"""The projections a LoRA adapter may target, and each one's (in_features, out_features) in a model."""

from __future__ import annotations

from typing import Protocol

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LORA_TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES


class ProjectionSizes(Protocol):
    """The model sizes the projections follow (`executor_service.model.ModelConfig` has them)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int

    @property
    def q_size(self) -> int: ...

    @property
    def kv_size(self) -> int: ...


def module_shapes(config: ProjectionSizes) -> dict[str, tuple[int, int]]:
    """`{module: (in_features, out_features)}` of every LoRA target module of one decoder layer."""
    hidden, inner = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (hidden, config.q_size),
        "k_proj": (hidden, config.kv_size),
        "v_proj": (hidden, config.kv_size),
        "o_proj": (config.q_size, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


def module_parent(module: str) -> str:
    """The Hugging Face submodule holding `module`: "self_attn" or "mlp"."""
    return "self_attn" if module in ATTENTION_MODULES else "mlp"
