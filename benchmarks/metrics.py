"""Serving metrics as `vllm bench serve` defines them, computed from what the client timed per request."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the client saw of one request. Times are seconds since the benchmark started.

    `chunk_times[i]` is when the i-th response carrying tokens arrived and `chunk_num_tokens[i]` how many
    it carried; `end_time` is when the final response arrived (or the call failed).
    """

    index: int
    send_time: float
    end_time: float
    chunk_times: tuple[float, ...] = ()
    chunk_num_tokens: tuple[int, ...] = ()
    num_prompt_tokens: int = 0
    num_cached_prompt_tokens: int = 0
    output_token_ids: tuple[int, ...] = ()
    error: str = ""

    def __post_init__(self) -> None:
        assert len(self.chunk_times) == len(self.chunk_num_tokens), "one token count per chunk"
        assert list(self.chunk_times) == sorted(self.chunk_times), "chunks arrive in order"

    @property
    def is_success(self) -> bool:
        return not self.error

    @property
    def num_output_tokens(self) -> int:
        return sum(self.chunk_num_tokens)

    @property
    def ttft(self) -> float | None:
        """Time to first token: send to the first response carrying a token."""
        return self.chunk_times[0] - self.send_time if self.chunk_times else None

    @property
    def e2e_latency(self) -> float:
        return self.end_time - self.send_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (latency - TTFT) / (output tokens - 1)."""
        ttft = self.ttft
        if ttft is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_latency - ttft) / (self.num_output_tokens - 1)

    @property
    def itls(self) -> tuple[float, ...]:
        """Inter-token latencies: the gaps between successive responses carrying tokens."""
        return tuple(later - earlier for earlier, later in zip(self.chunk_times, self.chunk_times[1:]))


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Milliseconds; every figure is None when there was no sample."""

    mean_ms: float | None
    median_ms: float | None
    p99_ms: float | None
    num_samples: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencySummary:
        if not seconds:
            return cls(None, None, None, 0)
        values = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(
            float(values.mean()), float(np.median(values)), float(np.percentile(values, 99)), len(values)
        )


@dataclass(frozen=True, slots=True)
class BenchmarkMetrics:
    """Totals, throughputs (per second of benchmark duration) and latency distributions of one run.

    Token counts and latencies cover successful requests only; failed ones are counted in `num_failed`.
    """

    num_completed: int
    num_failed: int
    duration_s: float
    total_prompt_tokens: int
    total_output_tokens: int
    cached_prompt_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    peak_output_throughput: float
    ttft: LatencySummary
    tpot: LatencySummary
    itl: LatencySummary
    e2e_latency: LatencySummary

    @property
    def cached_prompt_fraction(self) -> float:
        return self.cached_prompt_tokens / self.total_prompt_tokens if self.total_prompt_tokens else 0.0


def output_throughput_over_time(
    records: Sequence[RequestRecord], bucket_s: float = 1.0
) -> list[tuple[float, float]]:
    """(bucket start in s, output tokens/s in that bucket) from the start to the last token."""
    if bucket_s <= 0:
        raise ValueError(f"bucket_s must be positive, got {bucket_s}")
    times = [
        t
        for r in records
        if r.is_success
        for t, n in zip(r.chunk_times, r.chunk_num_tokens)
        for _ in range(n)
    ]
    if not times:
        return []
    num_buckets = int(math.floor(max(times) / bucket_s)) + 1
    counts = np.bincount(np.floor(np.asarray(times) / bucket_s).astype(np.int64), minlength=num_buckets)
    return [(index * bucket_s, float(count) / bucket_s) for index, count in enumerate(counts)]


def compute_metrics(records: Sequence[RequestRecord], duration_s: float) -> BenchmarkMetrics:
    """The run's metrics; `duration_s` is from the first send to the last response."""
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    done = [r for r in records if r.is_success]
    total_prompt = sum(r.num_prompt_tokens for r in done)
    total_output = sum(r.num_output_tokens for r in done)
    over_time = output_throughput_over_time(done)
    return BenchmarkMetrics(
        num_completed=len(done),
        num_failed=len(records) - len(done),
        duration_s=duration_s,
        total_prompt_tokens=total_prompt,
        total_output_tokens=total_output,
        cached_prompt_tokens=sum(r.num_cached_prompt_tokens for r in done),
        request_throughput=len(done) / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_prompt + total_output) / duration_s,
        peak_output_throughput=max((rate for _, rate in over_time), default=0.0),
        ttft=LatencySummary.of([t for r in done if (t := r.ttft) is not None]),
        tpot=LatencySummary.of([t for r in done if (t := r.tpot) is not None]),
        itl=LatencySummary.of([gap for r in done for gap in r.itls]),
        e2e_latency=LatencySummary.of([r.e2e_latency for r in done]),
    )
