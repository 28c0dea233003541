"""What a user would otherwise run: Hugging Face transformers' static `generate` and `generate_batch`."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.system_run import HF_GENERATE, HF_GENERATE_BATCH, SystemRun
from benchmarks.workloads import BenchRequest

PAD_TOKEN_ID = 0
# generate_batch logs through its own logger, at INFO, whatever transformers' verbosity is.
CONTINUOUS_BATCHING_LOGGER = "ContinuousBatchingLogger"
NUM_WARMUP_TOKENS = 2


@dataclass(frozen=True, slots=True)
class ContinuousBatchingSettings:
    """`generate_batch`'s cache and batch sizes. Its default sizes the cache from host RAM and runs
    several times slower on CPU; these were the best found for this benchmark (see benchmarks/README.md)."""

    page_size: int = 16
    num_blocks: int = 2048
    max_batch_tokens: int = 512
    max_requests_per_batch: int = 64


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    """Runs the block with `num_threads` torch intra-op threads, then restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_hf_model(model_dir: Path):  # -> transformers.PreTrainedModel
    """The checkpoint in fp32, in eval mode, with EOS disabled so every request runs to its length."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger(CONTINUOUS_BATCHING_LOGGER).setLevel(logging.ERROR)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    model.generation_config.eos_token_id = None
    return model


def _prompt_ids(requests: Sequence[BenchRequest]) -> list[list[int]]:
    if any(not r.prompt_token_ids for r in requests):
        raise ValueError("the transformers baselines take token-id prompts only")
    return [list(r.prompt_token_ids) for r in requests]


def _static_batch(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """One left-padded `generate` call with an explicit attention mask; returns the new tokens of each row."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[PAD_TOKEN_ID] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD_TOKEN_ID
    )
    with torch.inference_mode():
        output = model.generate(input_ids, attention_mask=attention_mask, generation_config=config)
    return output[:, width:].tolist()


class RunTooSlow(RuntimeError):
    """A run passed its time limit and was abandoned (on a shared machine: usually CPU contention)."""


def run_static_generate(
    model,
    requests: Sequence[BenchRequest],
    workload: str,
    batch_size: int,
    num_threads: int,
    time_limit_s: float | None = None,
) -> SystemRun:
    """Batches of `batch_size` in workload order; each batch runs to its longest request and only the
    tokens each request asked for are counted. Raises RunTooSlow when a batch ends past `time_limit_s`."""
    prompts = _prompt_ids(requests)
    outputs: list[tuple[int, ...]] = []
    with torch_threads(num_threads):
        _static_batch(model, prompts[:2], NUM_WARMUP_TOKENS)
        started = time.perf_counter()
        for first in range(0, len(requests), batch_size):
            batch = requests[first : first + batch_size]
            new_tokens = _static_batch(
                model, prompts[first : first + batch_size], max(r.max_tokens for r in batch)
            )
            outputs += [tuple(tokens[: r.max_tokens]) for tokens, r in zip(new_tokens, batch)]
            elapsed = time.perf_counter() - started
            if time_limit_s is not None and elapsed > time_limit_s and len(outputs) < len(requests):
                raise RunTooSlow(
                    f"{HF_GENERATE} {workload} with {num_threads} threads: {len(outputs)} of {len(requests)} "
                    f"requests after {elapsed:.0f} s, past the {time_limit_s:.0f} s limit"
                )
        duration = time.perf_counter() - started
    return SystemRun(
        system=HF_GENERATE,
        workload=workload,
        num_threads=num_threads,
        duration_s=duration,
        num_prompt_tokens=sum(len(p) for p in prompts),
        num_output_tokens=sum(r.max_tokens for r in requests),
        outputs=tuple(outputs),
    )


def _generate_batch(
    model, prompts: list[list[int]], max_new_tokens: int, settings: ContinuousBatchingSettings
):
    from transformers import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD_TOKEN_ID
    )
    batching = ContinuousBatchingConfig(
        page_size=settings.page_size,
        num_blocks=settings.num_blocks,
        max_batch_tokens=settings.max_batch_tokens,
        max_requests_per_batch=settings.max_requests_per_batch,
    )
    with torch.inference_mode():
        results = model.generate_batch(prompts, generation_config=config, continuous_batching_config=batching)
    failed = [request_id for request_id, result in results.items() if result.error is not None]
    if failed or len(results) != len(prompts):
        raise RuntimeError(
            f"generate_batch returned {len(results)} of {len(prompts)} results, failed: {failed}"
        )
    return [tuple(result.generated_tokens) for result in results.values()]


def run_generate_batch(
    model,
    requests: Sequence[BenchRequest],
    workload: str,
    settings: ContinuousBatchingSettings,
    num_threads: int,
) -> SystemRun:
    """transformers' continuous batching; it takes one output length for all requests."""
    lengths = {r.max_tokens for r in requests}
    if len(lengths) != 1:
        raise ValueError(
            f"generate_batch takes one output length for all requests, the workload has {len(lengths)}"
        )
    prompts = _prompt_ids(requests)
    with torch_threads(num_threads):
        _generate_batch(model, prompts[:2], NUM_WARMUP_TOKENS, settings)
        started = time.perf_counter()
        outputs = _generate_batch(model, prompts, lengths.pop(), settings)
        duration = time.perf_counter() - started
    return SystemRun(
        system=HF_GENERATE_BATCH,
        workload=workload,
        num_threads=num_threads,
        duration_s=duration,
        num_prompt_tokens=sum(len(p) for p in prompts),
        num_output_tokens=sum(len(tokens) for tokens in outputs),
        outputs=tuple(outputs),
    )
