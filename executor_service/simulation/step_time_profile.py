"""A simulated executor's profile: its step-time model and the hardware facts it reports, read from JSON.

Profiles live in `profiles/NAME.json`; each records where its figures come from (`sources`, and for a
fitted profile the `measurements` it was fitted to). Only the fields below are read; the rest document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True, slots=True)
class StepTimeModel:
    """Seconds of one forward: `base + per_scheduled_token * scheduled + per_context_token * context`.

    `scheduled` counts the tokens computed this step; `context` counts, over every scheduled sequence,
    the tokens its attention spans (computed before this step plus scheduled now). A step that
    schedules nothing runs no forward and takes no time.
    """

    base_seconds: float
    seconds_per_scheduled_token: float
    seconds_per_context_token: float

    def forward_seconds(self, num_scheduled_tokens: int, num_context_tokens: int) -> float:
        if num_scheduled_tokens == 0:
            return 0.0
        return (self.base_seconds + self.seconds_per_scheduled_token * num_scheduled_tokens
                + self.seconds_per_context_token * num_context_tokens)


@dataclass(frozen=True, slots=True)
class SimulatedModel:
    """The model a profile stands for, as `Describe` reports it (an `executor_info.DescribedModel`).
    The vocabulary and EOS ids are the tokenizer's, so the scheduler can decode what it is sent."""

    name: str
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    # Not in the profiles: the simulated executor serves no LoRA, which is what this is checked for.
    intermediate_size: int = 0


@dataclass(frozen=True, slots=True)
class StepTimeProfile:
    name: str
    step_time: StepTimeModel
    architecture: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: str
    max_model_len: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    swap_out_bytes_per_second: float
    swap_in_bytes_per_second: float
    device: str
    tokenizer: str

    @classmethod
    def load(cls, name_or_path: str) -> StepTimeProfile:
        """A profile by name (`profiles/NAME.json`) or by the path of a JSON file; ValueError naming the
        known profiles when there is no such profile or a field is missing."""
        path = Path(name_or_path)
        if not path.is_file():
            path = PROFILES_DIR / f"{name_or_path}.json"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.json")))
            raise ValueError(f"--simulate {name_or_path}: no such profile; known: {known} (or a JSON file)")
        raw = json.loads(path.read_text())
        try:
            return cls._from_dict(path.stem, raw)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"profile {path} is malformed ({error!r}): see {PROFILES_DIR}/*.json") from error

    @classmethod
    def _from_dict(cls, name: str, raw: dict[str, Any]) -> StepTimeProfile:
        step, model, cache, speeds = raw["step_time"], raw["model"], raw["cache"], raw["speeds"]
        return cls(
            name=name,
            step_time=StepTimeModel(
                base_seconds=float(step["base_seconds"]),
                seconds_per_scheduled_token=float(step["seconds_per_scheduled_token"]),
                seconds_per_context_token=float(step["seconds_per_context_token"]),
            ),
            architecture=str(model["architecture"]),
            num_layers=int(model["num_layers"]),
            num_attention_heads=int(model["num_attention_heads"]),
            num_kv_heads=int(model["num_kv_heads"]),
            head_dim=int(model["head_dim"]),
            hidden_size=int(model["hidden_size"]),
            dtype=str(model["dtype"]),
            max_model_len=int(model["max_model_len"]),
            kv_bytes_per_token=int(cache["kv_bytes_per_token"]),
            kv_cache_bytes=int(cache["kv_cache_bytes"]),
            swap_out_bytes_per_second=float(speeds["swap_out_bytes_per_second"]),
            swap_in_bytes_per_second=float(speeds["swap_in_bytes_per_second"]),
            device=str(raw["device"]),
            tokenizer=str(raw.get("tokenizer", "tiny")),
        )
