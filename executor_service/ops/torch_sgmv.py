"""The torch reference of SGMV shrink and expand: one plain matmul per adapter segment, in float32."""

from __future__ import annotations

import torch

from executor_service.ops.sgmv_segments import SgmvSegments


def check_segments(segments: SgmvSegments, num_tokens: int, num_slots: int) -> None:
    """Raises ValueError unless every segment lies within the batch and names an existing slot."""
    if segments.starts_cpu and segments.starts_cpu[-1] > num_tokens:
        raise ValueError(f"segments end at row {segments.starts_cpu[-1]} but the batch has {num_tokens} rows")
    if any(slot >= num_slots for slot in segments.slot_ids_cpu):
        raise ValueError(f"a segment names slot {max(segments.slot_ids_cpu)} but there are {num_slots} slots")


def check_sgmv_shrink_args(
    x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, segments: SgmvSegments
) -> None:
    """Raises ValueError unless x `[T, in]`, lora_a `[slots, rank, in]`, out `[T, rank]` float32 and
    the segments agree."""
    check_sgmv_shrink_shapes(x, lora_a, out)
    check_segments(segments, x.shape[0], lora_a.shape[0])


def check_sgmv_shrink_shapes(x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor) -> None:
    """The tensor half of `check_sgmv_shrink_args`."""
    if x.dim() != 2 or lora_a.dim() != 3 or out.dim() != 2:
        raise ValueError("sgmv_shrink needs x [tokens, in], lora_a [slots, rank, in] and out [tokens, rank]")
    if lora_a.shape[2] != x.shape[1] or out.shape != (x.shape[0], lora_a.shape[1]):
        raise ValueError(
            f"sgmv_shrink shapes disagree: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}, "
            f"out {tuple(out.shape)}"
        )
    if out.dtype != torch.float32:
        raise ValueError(f"sgmv_shrink writes a float32 out, got {out.dtype}")


def check_sgmv_expand_args(
    v: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, segments: SgmvSegments
) -> None:
    """Raises ValueError unless v `[T, rank]` float32, lora_b `[slots, out, rank]`, out `[T, out]` and
    the segments agree."""
    check_sgmv_expand_shapes(v, lora_b, out)
    check_segments(segments, v.shape[0], lora_b.shape[0])


def check_sgmv_expand_shapes(v: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor) -> None:
    """The tensor half of `check_sgmv_expand_args`."""
    if v.dim() != 2 or lora_b.dim() != 3 or out.dim() != 2:
        raise ValueError(
            "sgmv_expand needs v [tokens, rank], lora_b [slots, out, rank] and out [tokens, out]"
        )
    if lora_b.shape[2] != v.shape[1] or out.shape != (v.shape[0], lora_b.shape[1]):
        raise ValueError(
            f"sgmv_expand shapes disagree: v {tuple(v.shape)}, lora_b {tuple(lora_b.shape)}, "
            f"out {tuple(out.shape)}"
        )
    if v.dtype != torch.float32:
        raise ValueError(f"sgmv_expand reads a float32 v, got {v.dtype}")


def sgmv_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, out: torch.Tensor, segments: SgmvSegments, scale: float
) -> None:
    check_sgmv_shrink_args(x, lora_a, out, segments)
    out.zero_()
    for index, slot in enumerate(segments.slot_ids_cpu):
        rows = segments.rows(index)
        if slot >= 0 and rows.stop > rows.start:
            out[rows] = (x[rows].float() @ lora_a[slot].float().T) * scale


def sgmv_expand(v: torch.Tensor, lora_b: torch.Tensor, out: torch.Tensor, segments: SgmvSegments) -> None:
    check_sgmv_expand_args(v, lora_b, out, segments)
    for index, slot in enumerate(segments.slot_ids_cpu):
        rows = segments.rows(index)
        if slot >= 0 and rows.stop > rows.start:
            out[rows] = (out[rows].float() + v[rows] @ lora_b[slot].float().T).to(out.dtype)
