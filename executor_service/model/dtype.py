"""Chooses the torch dtype the model runs in from the user's choice and the checkpoint's."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(name: str, config_dtype: str | None, device: torch.device | str) -> torch.dtype:
    """The dtype for `name` in `auto|float32|bfloat16|float16`.

    "auto" is the checkpoint's dtype (`config_dtype`, bfloat16 when unknown) on CUDA and float32 on
    the CPU, where half-precision matmuls are slow and inexact.
    """
    if name == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        if config_dtype is None:
            return torch.bfloat16
        if config_dtype not in _DTYPES:
            raise ValueError(
                f"checkpoint dtype {config_dtype!r} is not supported: "
                "choose float32, bfloat16 or float16 explicitly"
            )
        return _DTYPES[config_dtype]
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unknown dtype {name!r}: choose auto, float32, bfloat16 or float16")
    return _DTYPES[name]
