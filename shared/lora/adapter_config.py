"""A PEFT LoRA adapter's `adapter_config.json`, read and checked against what the executor serves."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.lora.target_modules import LORA_TARGET_MODULES

ADAPTER_CONFIG_FILE = "adapter_config.json"
MAX_SUPPORTED_LORA_RANK = 256

# PEFT options that change the adapter's math or shape; each must be absent, empty, false or None.
_UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora)",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "layers_to_transform": "a subset of layers (layers_to_transform)",
    "layers_pattern": "a layers pattern (layers_pattern)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "fan_in_fan_out": "transposed weights (fan_in_fan_out)",
    "layer_replication": "layer replication (layer_replication)",
    "target_parameters": "parameter targets (target_parameters)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "exclude_modules": "exclude_modules",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
}


@dataclass(frozen=True, slots=True)
class LoraAdapterConfig:
    """A checked LoRA adapter: `rank`, PEFT's `lora_alpha`, and the modules it targets (sorted).

    `scaling` multiplies `B @ A`: `lora_alpha / rank`, or `lora_alpha / sqrt(rank)` with rsLoRA.
    """

    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def adapter_directory(path: str | Path) -> Path:
    """`path` as an adapter directory; ValueError unless it is a directory holding adapter_config.json."""
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"LoRA adapter path {str(path)!r} is not a directory (it must hold {ADAPTER_CONFIG_FILE})")
    if not (directory / ADAPTER_CONFIG_FILE).is_file():
        raise ValueError(f"LoRA adapter directory {str(path)!r} holds no {ADAPTER_CONFIG_FILE}")
    return directory


def _target_modules(raw: Any, where: str) -> tuple[str, ...]:
    if raw == "all-linear":
        return tuple(sorted(LORA_TARGET_MODULES))
    if isinstance(raw, str) or not isinstance(raw, list | tuple) or not raw:
        raise ValueError(
            f"{where}: target_modules must be a non-empty list of {', '.join(LORA_TARGET_MODULES)} "
            f"(or \"all-linear\"), got {raw!r}"
        )
    names = sorted({str(name).rsplit(".", 1)[-1] for name in raw})
    unsupported = [name for name in names if name not in LORA_TARGET_MODULES]
    if unsupported:
        raise ValueError(
            f"{where}: target modules {unsupported} are not supported; a LoRA adapter may target "
            f"{', '.join(LORA_TARGET_MODULES)} (embedding and lm_head targets are not served)"
        )
    return tuple(names)


def parse_adapter_config(raw: dict[str, Any], max_lora_rank: int, where: str = "adapter") -> LoraAdapterConfig:
    """Checks a parsed adapter_config.json; ValueError whose message starts with `where` and names the
    offending setting (not LoRA, unsupported option, bias, rank above `max_lora_rank`, bad targets)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: {ADAPTER_CONFIG_FILE} must hold a JSON object")
    peft_type = raw.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type {peft_type!r} is not supported; only LORA adapters are served")
    for key, what in _UNSUPPORTED_OPTIONS.items():
        if raw.get(key):
            raise ValueError(f"{where}: {what} is not supported (adapter_config.json has {key}={raw[key]!r})")
    bias = raw.get("bias", "none")
    if bias != "none":
        raise ValueError(f"{where}: bias {bias!r} is not supported; only bias \"none\" adapters are served")
    rank = raw.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"{where}: rank r must be a positive integer, got {rank!r}")
    if rank > max_lora_rank:
        raise ValueError(f"{where}: rank {rank} exceeds --max-lora-rank {max_lora_rank}")
    lora_alpha = raw.get("lora_alpha", 8)
    if not isinstance(lora_alpha, int | float) or isinstance(lora_alpha, bool) or not math.isfinite(lora_alpha):
        raise ValueError(f"{where}: lora_alpha must be a finite number, got {lora_alpha!r}")
    return LoraAdapterConfig(
        rank=rank,
        lora_alpha=float(lora_alpha),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=_target_modules(raw.get("target_modules"), where),
    )


def read_adapter_config(path: str | Path, max_lora_rank: int) -> LoraAdapterConfig:
    """Reads and checks `path/adapter_config.json` (see `parse_adapter_config`)."""
    directory = adapter_directory(path)
    config_path = directory / ADAPTER_CONFIG_FILE
    try:
        raw = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{config_path}: not readable JSON ({error})") from error
    return parse_adapter_config(raw, max_lora_rank, where=str(directory))
