"""PEFT LoRA adapters made for tests, and PEFT's own greedy generation as the token-for-token reference."""

from __future__ import annotations

import warnings
import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

# With the tiny model (hidden 64) random A and B of this std make the delta comparable to the base
# projection, so greedy tokens change; smaller values would leave many adapters indistinguishable.
DEFAULT_INIT_SCALE = 0.3


def _load_base(base_model_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


def make_peft_adapter(
    base_model_dir: Path,
    out_dir: Path,
    *,
    rank: int,
    target_modules: Sequence[str],
    lora_alpha: float,
    use_rslora: bool = False,
    seed: int = 0,
    init_scale: float = DEFAULT_INIT_SCALE,
    safe_serialization: bool = True,
) -> Path:
    """Writes a PEFT LoRA adapter of `base_model_dir` into `out_dir` and returns `out_dir`.

    Every `lora_A` and `lora_B` weight is drawn from N(0, init_scale^2) with `seed` (PEFT's init
    leaves B at zero, which would make the adapter a no-op). Saved as `adapter_model.safetensors`,
    or `adapter_model.bin` with `safe_serialization=False`.
    """
    return make_peft_adapter_of(
        _load_base(base_model_dir), out_dir, rank=rank, target_modules=target_modules, lora_alpha=lora_alpha,
        use_rslora=use_rslora, seed=seed, init_scale=init_scale, safe_serialization=safe_serialization,
    )


def make_peft_adapter_of(
    base_model: torch.nn.Module,
    out_dir: Path,
    *,
    rank: int,
    target_modules: Sequence[str],
    lora_alpha: float,
    use_rslora: bool = False,
    seed: int = 0,
    init_scale: float = DEFAULT_INIT_SCALE,
    safe_serialization: bool = True,
) -> Path:
    """`make_peft_adapter` for a base model already loaded (fp32); `base_model` itself is left unchanged."""
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        target_modules=list(target_modules),
        use_rslora=use_rslora,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(copy.deepcopy(base_model), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(peft_model.named_parameters()):
            if ".lora_A." in name or ".lora_B." in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * init_scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(out_dir, safe_serialization=safe_serialization)
    return out_dir


def peft_greedy(
    base_model_dir: Path, adapter_dir: Path | None, prompt_token_ids: Sequence[int], max_new_tokens: int
) -> list[int]:
    """The `max_new_tokens` tokens PEFT's `generate(do_sample=False)` appends to the prompt, in float32
    on the CPU (the base model alone when `adapter_dir` is None); never stops early on EOS."""
    return peft_greedy_of(_load_base(base_model_dir), adapter_dir, prompt_token_ids, max_new_tokens)


def peft_greedy_of(
    base_model: torch.nn.Module, adapter_dir: Path | None, prompt_token_ids: Sequence[int], max_new_tokens: int
) -> list[int]:
    """`peft_greedy` for a base model already loaded (fp32); `base_model` itself is left unchanged."""
    model = copy.deepcopy(base_model)
    model.generation_config.eos_token_id = None
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    prompt = torch.tensor([list(prompt_token_ids)])
    with torch.no_grad():
        # An explicit mask: without it, generate treats prompt tokens equal to pad_token_id as padding.
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, prompt.shape[1]:].tolist()
