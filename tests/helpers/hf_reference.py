"""The references nobody here wrote: Hugging Face transformers' greedy tokens on the same weights, fp32."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM


def load_hf_model(model_dir: str | Path):
    """transformers' model of `model_dir` in fp32 that never stops at EOS (as requests with ignore_eos)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(model, prompt: Sequence[int], num_new_tokens: int) -> list[int]:
    """The `num_new_tokens` greedy tokens transformers generates after `prompt`. The explicit mask matters:
    without it, generate treats prompt tokens equal to pad_token_id as padding."""
    output = model.generate(torch.tensor([list(prompt)]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=num_new_tokens, do_sample=False, pad_token_id=0)
    return output[0, len(prompt):].tolist()


def hf_greedy_all(model_dir: str | Path, prompts: Sequence[Sequence[int]], num_new_tokens: int) -> list[list[int]]:
    model = load_hf_model(model_dir)
    return [hf_greedy(model, prompt, num_new_tokens) for prompt in prompts]
