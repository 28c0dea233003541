"""Scheduler state read at scrape time: vLLM's gauges and cache/preemption counters, and pagewire's own."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from scheduler_service.engine import Engine
from scheduler_service.metrics.engine_metrics import ENGINE_INDEX, LABELS
from scheduler_service.served_model_name import served_model_name


class SchedulerCollector(Collector):
    """Reads the engine's replicas on every scrape (nothing to keep in step); with several executors
    every value is the sum over them.

    The counters are the schedulers' cumulative `SchedulerCounters`; an executor's start again from 0
    when it comes back with another cache geometry and its replica builds a new scheduler, which
    Prometheus' `rate()` reads as a counter reset. Prefix-cache queries and hits count tokens, as in
    vLLM: hits are prompt tokens served from the cache at admission, queries those plus the prompt
    tokens computed. Nothing is reported before an executor described its model.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        model_name = served_model_name(engine)
        if model_name is None or engine.model is None:
            return
        labels = [model_name, ENGINE_INDEX]
        total = engine.totals()
        counters = total.counters

        def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, documentation, labels=LABELS)
            family.add_metric(labels, value)
            return family

        def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, documentation, labels=LABELS)
            family.add_metric(labels, value)
            return family

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", total.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", total.num_waiting)
        yield gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
            total.num_used_device_blocks / total.num_device_blocks if total.num_device_blocks else 0.0,
        )
        yield counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
            counters.num_prompt_tokens_computed + counters.num_prompt_tokens_cached,
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
            counters.num_prompt_tokens_cached,
        )
        yield counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine.", counters.num_preemptions
        )
        preemptions = CounterMetricFamily(
            "pagewire:num_preemptions", "Preemptions by how the sequence left the device.", labels=[*LABELS, "mode"]
        )
        preemptions.add_metric([*labels, "swap"], counters.num_preemptions_swap)
        preemptions.add_metric([*labels, "recompute"], counters.num_preemptions_recompute)
        yield preemptions
        yield counter(
            "pagewire:num_blocks_swapped_out", "KV blocks copied from the device to the host swap pool.",
            counters.num_blocks_swapped_out,
        )
        yield counter(
            "pagewire:num_blocks_swapped_in", "KV blocks copied from the host swap pool back to the device.",
            counters.num_blocks_swapped_in,
        )
        yield counter(
            "pagewire:num_tokens_recomputed", "Tokens computed again after a recompute preemption dropped their KV.",
            counters.num_tokens_recomputed,
        )
        yield counter(
            "pagewire:plan_bytes", "Encoded bytes of the step plans sent to the executor.",
            total.num_plan_bytes_sent,
        )
        yield gauge("pagewire:num_requests_swapped", "Requests whose KV sits in the host swap pool.", total.num_swapped)
        yield gauge("pagewire:num_free_device_blocks", "Device KV blocks no sequence holds.", total.num_free_device_blocks)
        if engine.adapters.enabled:
            yield from self._lora_metrics(labels, counter)
        if engine.config.speculative_config is not None:
            yield counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.", counters.num_drafts)
            yield counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.", counters.num_draft_tokens)
            yield counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                          counters.num_accepted_draft_tokens)
            per_position = CounterMetricFamily(
                "vllm:spec_decode_num_accepted_tokens_per_pos", "Accepted tokens per draft position.",
                labels=[*LABELS, "position"],
            )
            for position, count in enumerate(counters.num_accepted_per_position):
                per_position.add_metric([*labels, str(position)], count)
            yield per_position

    def _lora_metrics(self, labels: list[str], counter) -> Iterator[Metric]:
        """vLLM's `lora_requests_info` (adapter names in labels, the scrape time as value) and the
        adapter loads into LoRA slots, cumulative."""
        usage = self.engine.lora_usage()
        info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running stats on lora requests.",
            labels=["running_lora_adapters", "max_lora", "waiting_lora_adapters"],
        )
        info.add_metric([",".join(usage.running), str(usage.max_loras), ",".join(usage.waiting)], time.time())
        yield info
        yield counter("pagewire:lora_slot_loads", "Adapters loaded into executor LoRA slots.", usage.num_slot_loads)
