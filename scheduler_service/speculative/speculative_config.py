"""`--speculative-config`, spelled as vLLM spells it: a JSON object."""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """N-gram (prompt lookup) speculation: up to `num_speculative_tokens` drafts per step, taken from
    where the longest suffix of `prompt_lookup_min`..`prompt_lookup_max` tokens occurred before."""

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4

    @classmethod
    def parse(cls, text: str) -> SpeculativeConfig:
        """Raises ValueError naming the key to fix."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--speculative-config is not JSON: {error}") from None
        if not isinstance(raw, dict):
            raise ValueError("--speculative-config must be a JSON object, e.g. "
                             '\'{"method": "ngram", "num_speculative_tokens": 4}\'')
        method = raw.get("method")
        if method == "draft_model":
            raise ValueError("--speculative-config method draft_model is not supported yet; use ngram")
        if method != "ngram":
            raise ValueError(f"--speculative-config method must be ngram, got {method!r}")
        unknown = sorted(set(raw) - {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"})
        if unknown:
            raise ValueError(f"--speculative-config has unknown keys {unknown}")
        config = cls(
            method=method,
            num_speculative_tokens=_int(raw, "num_speculative_tokens", None),
            prompt_lookup_min=_int(raw, "prompt_lookup_min", 2),
            prompt_lookup_max=_int(raw, "prompt_lookup_max", 4),
        )
        if not 1 <= config.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"--speculative-config num_speculative_tokens must be in 1..{MAX_SPECULATIVE_TOKENS}")
        if not 1 <= config.prompt_lookup_min <= config.prompt_lookup_max:
            raise ValueError("--speculative-config needs 1 <= prompt_lookup_min <= prompt_lookup_max")
        return config


def _int(raw: dict, key: str, default: int | None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ValueError(f"--speculative-config needs {key}")
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"--speculative-config {key} must be an integer, got {value!r}")
    return value
