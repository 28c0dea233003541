"""The scale-out benchmark's reading of the scheduler's Prometheus text: sums over every label set."""

from __future__ import annotations

from benchmarks.scale_out import BUSY_METRIC, STEPS_METRIC, _metric_sum

METRICS_TEXT = """\
# HELP pagewire:executor_busy_seconds_total Time the executor spent executing steps.
# TYPE pagewire:executor_busy_seconds_total counter
pagewire:executor_busy_seconds_total{model_name="simulated:h100_llama3_8b"} 12.5
pagewire:executor_busy_seconds_total{model_name="other"} 0.25
pagewire:executor_busy_seconds_created{model_name="other"} 1.7e9
pagewire:step_duration_seconds_count{model_name="simulated:h100_llama3_8b"} 321.0
pagewire:step_duration_seconds_sum{model_name="simulated:h100_llama3_8b"} 9.0
"""


def test_metric_sums_add_every_label_set_of_exactly_that_name():
    assert _metric_sum(METRICS_TEXT, BUSY_METRIC) == 12.75
    assert _metric_sum(METRICS_TEXT, STEPS_METRIC) == 321.0
    assert _metric_sum(METRICS_TEXT, "pagewire:missing") == 0.0
