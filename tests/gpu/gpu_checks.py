"""Helpers of the GPU suite: allocator poisoning and relative-error bounds."""

from __future__ import annotations

import torch


def poison_allocator(device: torch.device, sizes_in_bytes: list[int]) -> None:
    """Leaves freed blocks of these sizes filled with 0xFF (NaN in fp32, fp16 and bf16) in torch's
    caching allocator, so the next `torch.empty` of a matching size hands out NaN: an output element a
    kernel forgets to write then fails the comparison instead of passing by luck."""
    blocks = [torch.empty(size, dtype=torch.uint8, device=device).fill_(0xFF) for size in sizes_in_bytes]
    torch.cuda.synchronize(device)
    del blocks


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64; NaN anywhere makes it NaN (and fail any bound)."""
    difference = (actual.double() - expected.double()).norm()
    return float(difference / expected.double().norm().clamp_min(1e-30))


# ‖out − ref‖/‖ref‖ bounds for outputs stored in each dtype (fp32 accumulation in both).
RELATIVE_BOUNDS = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
