"""The model every executor of one scheduler serves: the facts requests are validated against."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler_service.executor_description import ExecutorDescription
from scheduler_service.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class ServedModel:
    """Read from the first executor that described itself; every other executor must match it
    (`mismatch`), so a request validated here can run on any of them.

    `max_model_len` is the scheduler's limit: the model's, lowered by --max-model-len.
    """

    model_name: str
    model_path: str
    architecture: str
    vocab_size: int
    max_model_len: int
    max_logprobs: int
    eos_token_ids: tuple[int, ...]
    tokenizer: Tokenizer
    fingerprint: str = ""

    @classmethod
    def from_description(
        cls, description: ExecutorDescription, max_model_len: int | None, tokenizer: Tokenizer
    ) -> ServedModel:
        return cls(
            model_name=description.model_name,
            model_path=description.model_path,
            architecture=description.architecture,
            vocab_size=description.vocab_size,
            max_model_len=min(max_model_len or description.max_model_len, description.max_model_len),
            max_logprobs=description.max_logprobs,
            eos_token_ids=description.eos_token_ids,
            tokenizer=tokenizer,
            fingerprint=description.fingerprint,
        )

    def mismatch(self, description: ExecutorDescription) -> str | None:
        """Why an executor describing `description` serves another model than this one; None if it
        serves this one (same checkpoint path, architecture, vocabulary, EOS ids and context length)."""
        ours = (self.model_path, self.architecture, self.vocab_size, self.eos_token_ids)
        theirs = (description.model_path, description.architecture, description.vocab_size, description.eos_token_ids)
        if ours != theirs:
            return (
                f"it serves {theirs} (path, architecture, vocab size, EOS ids), the others {ours}; "
                "start every executor of a scheduler with the same model"
            )
        if description.fingerprint != self.fingerprint:
            return (
                f"its weights changed (fingerprint {description.fingerprint or 'none'}, the scheduler serves "
                f"{self.fingerprint or 'none'}) though the path is the same: the model changed; restart the "
                "scheduler to serve the new weights, or start the executor with the old ones"
            )
        if description.max_model_len < self.max_model_len:
            return (
                f"its model is {description.max_model_len} tokens long, the scheduler serves "
                f"{self.max_model_len}; start it with the same model"
            )
        return None
