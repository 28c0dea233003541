"""Which row shards make up each fused parameter (q/k/v, gate/up), and the view each shard fills."""

from __future__ import annotations

import torch

from executor_service.model.config import ModelConfig
from executor_service.model.llama import LlamaForCausalLM


def expected_shards(model: LlamaForCausalLM) -> dict[str, tuple[str, ...]]:
    """Parameter name -> the shards a checkpoint must fill; "" is the whole parameter."""
    shards: dict[str, tuple[str, ...]] = {}
    for name, _ in model.named_parameters():
        if ".qkv_proj." in name:
            shards[name] = ("q", "k", "v")
        elif ".gate_up_proj." in name:
            shards[name] = ("gate", "up")
        else:
            shards[name] = ("",)
    return shards


def shard_rows(parameter: torch.Tensor, shard: str, config: ModelConfig) -> torch.Tensor:
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


def missing_shards(pending: dict[str, set[str]]) -> list[str]:
    """`name[shard]` (or `name`) for every shard no checkpoint tensor filled, sorted."""
    return sorted(
        f"{name}[{shard}]" if shard else name for name, shards in pending.items() for shard in shards
    )
