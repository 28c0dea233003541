"""The serving benchmark's outputs: a one-screen summary table and a JSON file of every request."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.metrics import BenchmarkMetrics, LatencySummary, RequestRecord, output_throughput_over_time

SERVE_SCHEMA = "pagewire.bench.serve/v1"
WIDTH = 50
_LATENCIES = (
    ("ttft", "Time to First Token", "TTFT"),
    ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
    ("itl", "Inter-token Latency", "ITL"),
    ("e2e_latency", "End-to-end Latency", "E2EL"),
)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 4)


def record_to_dict(record: RequestRecord) -> dict[str, Any]:
    """Every per-request figure; times in seconds since the start, latencies in milliseconds."""
    return {
        "index": record.index,
        "success": record.is_success,
        "error": record.error,
        "num_prompt_tokens": record.num_prompt_tokens,
        "num_cached_prompt_tokens": record.num_cached_prompt_tokens,
        "num_output_tokens": record.num_output_tokens,
        "send_time_s": round(record.send_time, 6),
        "end_time_s": round(record.end_time, 6),
        "ttft_ms": _ms(record.ttft),
        "tpot_ms": _ms(record.tpot),
        "e2e_latency_ms": _ms(record.e2e_latency),
        "itl_ms": [_ms(gap) for gap in record.itls],
        "chunk_times_s": [round(t, 6) for t in record.chunk_times],
        "chunk_num_tokens": list(record.chunk_num_tokens),
    }


def metrics_to_dict(metrics: BenchmarkMetrics) -> dict[str, Any]:
    content = asdict(metrics)
    content["cached_prompt_fraction"] = metrics.cached_prompt_fraction
    return content


def serve_result(
    config: dict[str, Any],
    server: dict[str, Any],
    records: Sequence[RequestRecord],
    metrics: BenchmarkMetrics,
) -> dict[str, Any]:
    """The `--json` document: what was run, against what, the metrics and every request."""
    return {
        "schema": SERVE_SCHEMA,
        "config": config,
        "server": server,
        "metrics": metrics_to_dict(metrics),
        "output_throughput_over_time": [[t, rate] for t, rate in output_throughput_over_time(records)],
        "requests": [record_to_dict(record) for record in records],
    }


def write_json(path: str | Path, content: dict[str, Any]) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    return target


def _line(label: str, value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.2f}"
    elif value is None:
        value = "n/a"
    return f"{label + ':':<40}{value:>10}"


def _latency_lines(summary: LatencySummary, short: str) -> list[str]:
    return [
        _line(f"Mean {short} (ms)", summary.mean_ms),
        _line(f"Median {short} (ms)", summary.median_ms),
        _line(f"P99 {short} (ms)", summary.p99_ms),
    ]


def format_summary(metrics: BenchmarkMetrics, title: str = "Serving Benchmark Result") -> str:
    """The table `vllm bench serve` prints, plus the prompt tokens served from the prefix cache."""
    lines = [
        f" {title} ".center(WIDTH, "="),
        _line("Successful requests", metrics.num_completed),
        _line("Failed requests", metrics.num_failed),
        _line("Benchmark duration (s)", metrics.duration_s),
        _line("Total input tokens", metrics.total_prompt_tokens),
        _line("Total generated tokens", metrics.total_output_tokens),
        _line("Prompt tokens from cache", metrics.cached_prompt_tokens),
        _line("Prompt tokens from cache (%)", 100.0 * metrics.cached_prompt_fraction),
        _line("Request throughput (req/s)", metrics.request_throughput),
        _line("Output token throughput (tok/s)", metrics.output_throughput),
        _line("Peak output token throughput (tok/s)", metrics.peak_output_throughput),
        _line("Total token throughput (tok/s)", metrics.total_token_throughput),
    ]
    for field, heading, short in _LATENCIES:
        lines.append(f" {heading} ".center(WIDTH, "-"))
        lines += _latency_lines(getattr(metrics, field), short)
    lines.append("=" * WIDTH)
    return "\n".join(lines)
