"""EngineMetrics: vLLM's exposition names and exact values from a request's deltas and the engine's steps."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from executor_service.tiny_model import create_tiny_model
from scheduler_service.engine_observer import StepRecord
from scheduler_service.metrics.engine_metrics import EngineMetrics, build_1_2_5_buckets
from scheduler_service.request_state import RequestDelta, RequestState, Usage
from scheduler_service.tokenizer import Tokenizer
from shared.sampling_params import SamplingParams
from shared.step_plan import SequenceId

LABELS = {"model_name": "m", "engine": "0"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_pretrained_dir(create_tiny_model(Path(tmp_path_factory.mktemp("tiny")), seed=3))


def test_build_1_2_5_buckets_matches_vllm() -> None:
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)
    assert build_1_2_5_buckets(4096) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


def test_one_request_and_one_step(tokenizer: Tokenizer) -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry, model_name=lambda: "m", max_model_len=lambda: 100)
    request = RequestState("r", SequenceId(1), (1, 2, 3), SamplingParams(), tokenizer, (2,), 100)
    t0 = request.timeline.arrival_seconds
    request.timeline.mark_scheduled(t0 + 0.25)
    metrics.on_delta(request, RequestDelta(token_ids=(5,), text="a"), t0 + 0.5)
    metrics.on_delta(request, RequestDelta(token_ids=(6, 7)), t0 + 0.75)
    metrics.on_delta(request, RequestDelta(finish_reason="length", usage=Usage(3, 3, 0)), t0 + 1.0)
    metrics.on_step(StepRecord(wall_seconds=0.004, executor_seconds=0.003, forward_seconds=0.002, num_tokens=8))

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {**LABELS, **labels})

    assert value("vllm:prompt_tokens_total") == 3
    assert value("vllm:generation_tokens_total") == 3
    assert value("vllm:request_success_total", finished_reason="length") == 1
    assert value("vllm:request_success_total", finished_reason="stop") == 0
    assert value("vllm:request_success_total", finished_reason="abort") == 0
    assert value("vllm:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert value("vllm:time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value("vllm:time_to_first_token_seconds_bucket", le="0.5") == 1
    assert value("vllm:inter_token_latency_seconds_count") == 1
    assert value("vllm:inter_token_latency_seconds_sum") == pytest.approx(0.25)
    assert value("vllm:e2e_request_latency_seconds_sum") == pytest.approx(1.0)
    assert value("vllm:request_queue_time_seconds_sum") == pytest.approx(0.25)
    assert value("vllm:request_prompt_tokens_bucket", le="2.0") == 0
    assert value("vllm:request_prompt_tokens_bucket", le="5.0") == 1
    assert value("vllm:request_generation_tokens_sum") == 3
    assert value("pagewire:step_duration_seconds_count") == 1
    assert value("pagewire:executor_idle_seconds_total") == pytest.approx(0.001)
    assert value("pagewire:executor_busy_seconds_total") == pytest.approx(0.003)
    text = generate_latest(registry).decode()
    assert "# TYPE vllm:prompt_tokens_total counter" in text
    assert "# TYPE vllm:e2e_request_latency_seconds histogram" in text
    assert 'vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 1.0' in text
    assert "_created" not in text


def test_nothing_is_recorded_while_the_model_name_is_unknown(tokenizer: Tokenizer) -> None:
    registry = CollectorRegistry()
    metrics = EngineMetrics(registry, model_name=lambda: None, max_model_len=lambda: None)
    request = RequestState("r", SequenceId(1), (1,), SamplingParams(), tokenizer, (2,), 100)
    metrics.on_delta(request, RequestDelta(token_ids=(5,)), request.timeline.arrival_seconds + 1)
    assert registry.get_sample_value("vllm:generation_tokens_total", LABELS) is None
