"""Serving metrics computed from known client timestamps."""

from __future__ import annotations

import pytest

from benchmarks.metrics import LatencySummary, RequestRecord, compute_metrics, output_throughput_over_time


def record(index: int, send: float, chunks: list[tuple[float, int]], end: float, **kwargs) -> RequestRecord:
    return RequestRecord(
        index=index,
        send_time=send,
        end_time=end,
        chunk_times=tuple(t for t, _ in chunks),
        chunk_num_tokens=tuple(n for _, n in chunks),
        **kwargs,
    )


def test_per_request_latencies_follow_vllm_definitions() -> None:
    r = record(0, 1.0, [(1.5, 1), (1.7, 1), (2.0, 2)], end=2.1, num_prompt_tokens=10)
    assert r.num_output_tokens == 4
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e_latency == pytest.approx(1.1)
    # (latency - ttft) / (tokens - 1) = 0.6 / 3
    assert r.tpot == pytest.approx(0.2)
    assert r.itls == pytest.approx((0.2, 0.3))


def test_single_token_and_tokenless_requests_have_no_tpot() -> None:
    one = record(0, 0.0, [(0.25, 1)], end=0.3)
    assert one.ttft == pytest.approx(0.25) and one.tpot is None and one.itls == ()
    none = record(1, 0.0, [], end=0.3, error="UNAVAILABLE: gone")
    assert none.ttft is None and none.tpot is None and not none.is_success


def test_compute_metrics_totals_throughputs_and_distributions() -> None:
    records = [
        record(
            0,
            0.0,
            [(0.1, 1), (0.2, 1), (0.3, 1)],
            end=0.3,
            num_prompt_tokens=100,
            num_cached_prompt_tokens=32,
        ),
        record(1, 0.0, [(0.3, 1), (0.4, 1)], end=0.5, num_prompt_tokens=50),
        record(2, 0.1, [(0.2, 1)], end=4.0, num_prompt_tokens=7, error="DEADLINE_EXCEEDED: late"),
    ]
    m = compute_metrics(records, duration_s=0.5)
    assert (m.num_completed, m.num_failed) == (2, 1)
    assert (m.total_prompt_tokens, m.total_output_tokens, m.cached_prompt_tokens) == (150, 5, 32)
    assert m.cached_prompt_fraction == pytest.approx(32 / 150)
    assert m.request_throughput == pytest.approx(4.0)
    assert m.output_throughput == pytest.approx(10.0)
    assert m.total_token_throughput == pytest.approx(310.0)
    assert m.ttft.mean_ms == pytest.approx(200.0) and m.ttft.median_ms == pytest.approx(200.0)
    # np.percentile's linear interpolation between 100 and 300 ms at the 99th percentile.
    assert m.ttft.p99_ms == pytest.approx(298.0)
    # TPOTs: (0.3 - 0.1) / 2 = 0.1 and (0.5 - 0.3) / 1 = 0.2.
    assert m.tpot.mean_ms == pytest.approx(150.0) and m.tpot.num_samples == 2
    # ITLs: 0.1, 0.1 and 0.1.
    assert m.itl.num_samples == 3 and m.itl.median_ms == pytest.approx(100.0)
    assert m.e2e_latency.mean_ms == pytest.approx(400.0) and m.e2e_latency.p99_ms == pytest.approx(498.0)
    assert m.peak_output_throughput == pytest.approx(5.0)


def test_output_throughput_over_time_counts_every_token_in_its_bucket() -> None:
    records = [
        record(0, 0.0, [(0.2, 2), (1.1, 1)], end=1.1),
        record(1, 0.0, [(1.9, 3)], end=2.5),
        record(2, 0.0, [(0.3, 9)], end=0.3, error="ABORTED: the server aborted the request"),
    ]
    assert output_throughput_over_time(records, bucket_s=1.0) == [(0.0, 2.0), (1.0, 4.0)]
    assert output_throughput_over_time(records, bucket_s=0.5) == [
        (0.0, 4.0),
        (0.5, 0.0),
        (1.0, 2.0),
        (1.5, 6.0),
    ]
    assert output_throughput_over_time([], bucket_s=1.0) == []


def test_latency_summary_of_nothing_is_empty() -> None:
    assert LatencySummary.of([]) == LatencySummary(None, None, None, 0)


def test_compute_metrics_rejects_a_non_positive_duration() -> None:
    with pytest.raises(ValueError, match="duration_s must be positive"):
        compute_metrics([], duration_s=0.0)
