"""The machine's compute roofline: measured fp32 matmul FLOP/s, and what fraction of it a run reaches."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from benchmarks.bench_model import BenchModelConfig
from benchmarks.workloads import BenchRequest

# 1024 x 1024 leaves two threads a third below their peak on a 2-core machine; 2048 reaches it.
MATMUL_SIZE = 2048
NUM_WINDOWS = 5
WINDOW_S = 0.5


def measure_matmul_flops(num_threads: int, size: int = MATMUL_SIZE, num_windows: int = NUM_WINDOWS) -> float:
    """Peak fp32 FLOP/s of a square matmul with `num_threads` torch threads: the best of `num_windows`
    timing windows, so that a moment of contention from other processes does not lower the bound."""
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        a = torch.randn(size, size, dtype=torch.float32)
        b = torch.randn(size, size, dtype=torch.float32)
        out = torch.empty(size, size, dtype=torch.float32)
        torch.matmul(a, b, out=out)
        best = 0.0
        for _ in range(num_windows):
            count = 0
            started = time.perf_counter()
            while (elapsed := time.perf_counter() - started) < WINDOW_S:
                torch.matmul(a, b, out=out)
                count += 1
            best = max(best, 2.0 * size**3 * count / elapsed)
        return best
    finally:
        torch.set_num_threads(previous)


def workload_flops(config: BenchModelConfig, requests: Sequence[BenchRequest]) -> float:
    """Useful FLOPs of a token-id workload whose requests each generate exactly `max_tokens`."""
    return sum(config.request_flops(len(r.prompt_token_ids), r.max_tokens) for r in requests)


def roofline_fraction(flops: float, duration_s: float, peak_flops_per_s: float) -> float:
    """Achieved useful FLOP/s over the measured peak."""
    if duration_s <= 0 or peak_flops_per_s <= 0:
        raise ValueError("duration and peak FLOP/s must be positive")
    return flops / duration_s / peak_flops_per_s
