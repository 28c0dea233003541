"""When each request is sent: all at once (offline throughput) or as a Poisson process at a given rate."""

from __future__ import annotations

import math
import random


def arrival_offsets(num_requests: int, request_rate: float, seed: int) -> tuple[float, ...]:
    """Seconds after the start at which each request is sent, non-decreasing, the first at 0.

    `request_rate` is requests per second; `math.inf` sends every request at once. A finite rate draws
    exponential gaps (a Poisson process), the same ones for the same seed.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(
            f"--request-rate must be positive (inf sends everything at once), got {request_rate}"
        )
    if math.isinf(request_rate):
        return (0.0,) * num_requests
    rng = random.Random(seed)
    offsets: list[float] = []
    now = 0.0
    for index in range(num_requests):
        if index > 0:
            now += rng.expovariate(request_rate)
        offsets.append(now)
    return tuple(offsets)
