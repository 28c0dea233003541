"""`--speculative-config`, spelled as vLLM spells it: a JSON object, read by the scheduler (how many
drafts, and who proposes them) and by the executor (the draft model to load)."""

from __future__ import annotations

import json
from dataclasses import dataclass

MAX_SPECULATIVE_TOKENS = 16
NGRAM = "ngram"
DRAFT_MODEL = "draft_model"
_KEYS = {
    NGRAM: {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "adaptive"},
    DRAFT_MODEL: {"method", "num_speculative_tokens", "model", "adaptive"},
}


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Up to `num_speculative_tokens` drafts per step and sequence, proposed by one of:

    - `ngram` (prompt lookup, in the scheduler): the tokens that followed where the longest suffix of
      `prompt_lookup_min`..`prompt_lookup_max` tokens occurred before;
    - `draft_model` (in the executor): greedy autoregressive steps of the smaller checkpoint at
      `model`, which must share the target's vocabulary.

    `adaptive` (pagewire's, default true): draft a request only while its acceptance pays for the
    drafts' cost, measured on the executor; false drafts every step (to measure drafting itself).
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    model: str | None = None
    adaptive: bool = True

    @property
    def uses_draft_model(self) -> bool:
        return self.method == DRAFT_MODEL

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
        if method not in _KEYS:
            raise ValueError(f"--speculative-config method must be ngram or draft_model, got {method!r}")
        unknown = sorted(set(raw) - _KEYS[method])
        if unknown:
            raise ValueError(f"--speculative-config has unknown keys {unknown} for method {method}")
        model = raw.get("model")
        if method == DRAFT_MODEL and (not isinstance(model, str) or not model):
            raise ValueError("--speculative-config method draft_model needs \"model\": the draft checkpoint "
                             "(e.g. one written by `pagewire create-draft-model`)")
        config = cls(
            method=method,
            num_speculative_tokens=_int(raw, "num_speculative_tokens", None),
            prompt_lookup_min=_int(raw, "prompt_lookup_min", 2),
            prompt_lookup_max=_int(raw, "prompt_lookup_max", 4),
            model=model,
            adaptive=raw.get("adaptive", True),
        )
        if not isinstance(config.adaptive, bool):
            raise ValueError(f"--speculative-config adaptive must be true or false, got {config.adaptive!r}")
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
