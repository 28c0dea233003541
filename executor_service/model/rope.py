"""Rotary position embedding in the rotate-half (NeoX / Hugging Face Llama) layout."""

from __future__ import annotations

import math
from typing import Any

import torch

from executor_service.ops.base import OpsBackend

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """The `[head_dim // 2]` float32 inverse frequencies, with `scaling` applied as Hugging Face does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inverse_frequencies(inv_freq, scaling)
    raise ValueError(
        f"unsupported rope_scaling type {rope_type!r}: pagewire supports {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_inverse_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, the band between interpolated."""
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Rotates query and key heads by their token positions.

    cos and sin for every position `< max_positions` are computed once in float32 (half the head
    dimension each, since the two halves share frequencies); the ops backend rotates by them.
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float,
        scaling: dict[str, Any] | None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        inv_freq = rope_inverse_frequencies(head_dim, theta, scaling).to(device)
        positions = torch.arange(max_positions, dtype=torch.int64, device=device).float()
        freqs = torch.outer(positions, inv_freq)
        self.max_positions = max_positions
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, ops: OpsBackend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates `query` `[T, H, D]` and `key` `[T, kvh, D]` by `positions` `[T]` with `ops` (which may
        rotate them in place: read only what it returns)."""
        return ops.rotary_embedding(positions, query, key, self.cos, self.sin)
