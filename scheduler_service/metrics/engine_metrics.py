"""Per-request and per-step Prometheus metrics under vLLM's names, fed by the engine as it runs.

Names, types, help texts and bucket boundaries follow vLLM's `PrometheusStatLogger` (v1), labelled
`model_name` and `engine` (always "0": one engine per scheduler), so a vLLM Grafana dashboard reads
them unchanged. Counters are exposed with prometheus_client's `_total` suffix, as vLLM's are.
"""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram

from scheduler_service.engine_observer import EngineObserver, StepRecord
from scheduler_service.request_state import FINISH_ABORT, FINISH_LENGTH, FINISH_STOP, RequestDelta, RequestState

LABELS = ("model_name", "engine")
ENGINE_INDEX = "0"
FINISH_REASONS = (FINISH_STOP, FINISH_LENGTH, FINISH_ABORT)
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0, 2560.0,
)
INTER_TOKEN_LATENCY_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0, 7680.0,
)
STEP_DURATION_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
DEFAULT_MAX_MODEL_LEN = 32768


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `max_value` included."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


class EngineMetrics(EngineObserver):
    """Observes every request's deltas and every step into `registry`.

    `model_name()` is the label value (None while unknown: nothing is recorded then, but no request
    can run before an executor described its model). `max_model_len()` sizes the token-count buckets,
    read when the first request finishes (the executor's limit is not known before).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        model_name: Callable[[], str | None],
        max_model_len: Callable[[], int | None],
    ) -> None:
        # vLLM exposes no `_created` series; this switch is process-wide in prometheus_client.
        prometheus_client.disable_created_metrics()
        self.registry = registry
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry=registry
        )
        self.generation_tokens = Counter(
            "vllm:generation_tokens", "Number of generation tokens processed.", LABELS, registry=registry
        )
        self.request_success = Counter(
            "vllm:request_success", "Count of successfully processed requests.", (*LABELS, "finished_reason"),
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", LABELS,
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS, registry=registry,
        )
        self.inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", LABELS,
            buckets=INTER_TOKEN_LATENCY_BUCKETS, registry=registry,
        )
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", LABELS,
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )
        self.request_queue_time = Histogram(
            "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", LABELS,
            buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        )
        self.step_duration = Histogram(
            "pagewire:step_duration_seconds",
            "Wall time of one engine step: plan sent (or previous result handled) to result handled.", LABELS,
            buckets=STEP_DURATION_BUCKETS, registry=registry,
        )
        self.executor_idle = Counter(
            "pagewire:executor_idle_seconds",
            "Time within steps the executor did not spend executing (waiting on the scheduler and transport).",
            LABELS, registry=registry,
        )
        self.executor_busy = Counter(
            "pagewire:executor_busy_seconds", "Time the executor spent executing steps.", LABELS, registry=registry
        )
        self.scheduled_tokens = Counter(
            "pagewire:scheduled_tokens", "Tokens computed by the executor (prefill and decode).", LABELS,
            registry=registry,
        )
        # Created at the first finished request, when max_model_len is known.
        self._request_prompt_tokens: Histogram | None = None
        self._request_generation_tokens: Histogram | None = None
        # The per-token series' children for the model name they were made for: every decode of every
        # request updates two of them, and `labels()` looks its child up under a lock each time.
        self._token_children: tuple[str, Histogram, Counter] | None = None

    def on_delta(self, request: RequestState, delta: RequestDelta, now: float) -> None:
        model_name = self.model_name()
        if model_name is None:
            return
        labels = (model_name, ENGINE_INDEX)
        timeline = request.timeline
        if delta.token_ids:
            children = self._token_children
            if children is None or children[0] != model_name:
                children = self._token_children = (model_name, self.inter_token_latency.labels(*labels),
                                                   self.generation_tokens.labels(*labels))
            gap = timeline.mark_tokens(now)
            if gap is None:
                self.prompt_tokens.labels(*labels).inc(request.num_prompt_tokens)
                ttft = timeline.time_to_first_token_seconds
                if ttft is not None:
                    self.time_to_first_token.labels(*labels).observe(ttft)
            else:
                children[1].observe(gap)
            children[2].inc(len(delta.token_ids))
        if delta.finish_reason is not None:
            self._on_finished(request, delta, labels, now)

    def _on_finished(self, request: RequestState, delta: RequestDelta, labels: tuple[str, str], now: float) -> None:
        for reason in FINISH_REASONS:  # every reason's series exists from the first finish on, as in vLLM
            self.request_success.labels(*labels, reason)
        self.request_success.labels(*labels, str(delta.finish_reason)).inc()
        timeline = request.timeline
        self.e2e_request_latency.labels(*labels).observe(now - timeline.arrival_seconds)
        queue_seconds = timeline.queue_seconds
        # A request aborted before it was ever scheduled spent its whole life queued.
        self.request_queue_time.labels(*labels).observe(
            now - timeline.arrival_seconds if queue_seconds is None else queue_seconds
        )
        prompt_histogram, generation_histogram = self._token_histograms()
        usage = delta.usage or request.usage()
        prompt_histogram.labels(*labels).observe(usage.prompt_tokens)
        generation_histogram.labels(*labels).observe(usage.completion_tokens)

    def _token_histograms(self) -> tuple[Histogram, Histogram]:
        if self._request_prompt_tokens is None or self._request_generation_tokens is None:
            buckets = build_1_2_5_buckets(self.max_model_len() or DEFAULT_MAX_MODEL_LEN)
            self._request_prompt_tokens = Histogram(
                "vllm:request_prompt_tokens", "Number of prefill tokens processed.", LABELS, buckets=buckets,
                registry=self.registry,
            )
            self._request_generation_tokens = Histogram(
                "vllm:request_generation_tokens", "Number of generation tokens processed.", LABELS,
                buckets=buckets, registry=self.registry,
            )
        return self._request_prompt_tokens, self._request_generation_tokens

    def on_step(self, step: StepRecord) -> None:
        model_name = self.model_name()
        if model_name is None:
            return
        labels = (model_name, ENGINE_INDEX)
        self.step_duration.labels(*labels).observe(step.wall_seconds)
        self.executor_busy.labels(*labels).inc(min(step.executor_seconds, step.wall_seconds))
        self.executor_idle.labels(*labels).inc(max(step.wall_seconds - step.executor_seconds, 0.0))
        self.scheduled_tokens.labels(*labels).inc(step.num_tokens)
