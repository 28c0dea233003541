"""Measures, at start-up, the speeds the scheduler uses to choose between swap and recompute."""

from __future__ import annotations

import time

import torch

from executor_service.executor_info import MeasuredSpeeds
from executor_service.kv_pool import KVPool
from executor_service.model_runner import ModelRunner
from shared.step_plan import BlockPairs, NewSequence, SequenceId, StepPlan

__all__ = ["MeasuredSpeeds", "measure_prefill", "measure_swap"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device: torch.device, repeats: int) -> float:
    """The fastest of `repeats` timed runs after one warm-up (the least disturbed by other work)."""
    fn()
    _synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


def measure_swap(kv_pool: KVPool, repeats: int = 3) -> tuple[float, float]:
    """Bytes/s of device->host and host->device block copies over up to 64 blocks."""
    num_blocks = min(64, kv_pool.num_device_blocks, kv_pool.num_host_blocks)
    if num_blocks == 0:
        return 0.0, 0.0
    ids = tuple(range(num_blocks))
    pairs = BlockPairs(ids, ids)
    num_bytes = num_blocks * kv_pool.geometry.bytes_per_block
    out_seconds = _best_seconds(lambda: kv_pool.swap_out(pairs), kv_pool.device, repeats)
    in_seconds = _best_seconds(lambda: kv_pool.swap_in(pairs), kv_pool.device, repeats)
    return num_bytes / out_seconds, num_bytes / in_seconds


def measure_prefill(runner: ModelRunner, num_tokens: int, vocab_size: int, repeats: int = 2) -> float:
    """Prompt tokens/s of one full-prompt forward, run through the real step path on scratch blocks.

    Uses the first blocks of the (still empty) pool and leaves the persistent batch empty.
    """
    block_size = runner.kv_pool.geometry.block_size
    num_tokens = max(1, min(num_tokens, runner.kv_pool.num_device_blocks * block_size))
    num_blocks = -(-num_tokens // block_size)
    generator = torch.Generator().manual_seed(0)
    token_ids = tuple(torch.randint(0, vocab_size, (num_tokens,), generator=generator).tolist())
    step_id = 0

    def run_once() -> None:
        nonlocal step_id
        step_id += 1
        plan = StepPlan(
            step_id=step_id,
            new_sequences=(
                NewSequence(
                    sequence_id=SequenceId(1),
                    token_ids=token_ids,
                    num_prompt_tokens=num_tokens,
                    num_computed_tokens=0,
                    block_ids=tuple(range(num_blocks)),
                    num_scheduled_tokens=num_tokens,
                ),
            ),
        )
        result = runner.execute(plan)
        assert result.error is None, result.error
        runner.reset()

    seconds = _best_seconds(run_once, runner.device, repeats)
    return num_tokens / seconds
