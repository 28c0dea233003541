"""`pagewire bench lora`'s pure parts: adapter spread, best runs and ratios, targets, the table, its
config and flags, the micro-benchmark's segments, and adapter files both services accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.bench_model import create_bench_model
from benchmarks.compare import TINY_MODEL
from benchmarks.lora_adapters import write_bench_adapter
from benchmarks.lora_bench import LoraBenchConfig, config_from_args, parse_counts
from benchmarks.lora_report import (
    LoadTimes,
    ThroughputRun,
    adapters_for_requests,
    best_runs,
    build_results,
    markdown_table,
    ratios_to_base,
    round_ratios,
    targets,
)
from benchmarks.sgmv_cpu_bench import SgmvCase, decode_case
from pagewire.cli import build_parser
from shared.lora.target_modules import LORA_TARGET_MODULES

RUNS = [
    ThroughputRun(0, 0, 10.0, 4096),
    ThroughputRun(32, 0, 16.0, 4096, num_changed_outputs=60),
    ThroughputRun(0, 1, 8.0, 4096),
    ThroughputRun(32, 1, 12.8, 4096, num_changed_outputs=60),
    ThroughputRun(8, 1, 9.0, 4096, num_changed_outputs=50),
]


def test_adapters_are_spread_over_the_batch_and_zero_means_the_base_model():
    assert adapters_for_requests(3, 5) == ["lora00", "lora01", "lora02", "lora00", "lora01"]
    assert adapters_for_requests(0, 3) == ["", "", ""]
    assert len(set(adapters_for_requests(32, 64))) == 32
    with pytest.raises(ValueError, match=">= 0"):
        adapters_for_requests(-1, 4)


def test_best_run_per_count_and_ratios_to_the_best_base_and_within_each_round():
    best = best_runs(RUNS)
    assert list(best) == [0, 8, 32]
    assert best[0].round_index == 1 and best[32].round_index == 1
    ratios = ratios_to_base(RUNS)
    assert ratios[0] == 1.0
    assert ratios[32] == pytest.approx(8.0 / 12.8)
    assert ratios[8] == pytest.approx(8.0 / 9.0)
    assert round_ratios(RUNS) == {0: [1.0, 1.0], 8: [pytest.approx(8 / 9)], 32: [0.625, 0.625]}
    with pytest.raises(ValueError, match="base-model run"):
        ratios_to_base([r for r in RUNS if r.num_adapters])
    with pytest.raises(ValueError, match="positive"):
        ThroughputRun(0, 0, 0.0, 10)


def test_targets_say_what_is_met():
    met = {t["target"].split(" ")[0]: t["met"] for t in targets(RUNS, LoadTimes((40.0, 99.0)))}
    assert met == {"32": False, "cold": True}
    assert not targets(RUNS, LoadTimes((40.0, 100.0)))[1]["met"]
    fast = [ThroughputRun(0, 0, 10.0, 1000), ThroughputRun(32, 0, 12.5, 1000)]
    assert targets(fast, LoadTimes((1.0,)))[0]["met"]  # exactly 0.8x
    assert targets(fast[:1], LoadTimes((1.0,)))[0]["measured"] == "not run"


def test_results_and_table():
    load = {"executor_cold": LoadTimes((5.0, 7.0, 6.0)), "executor_host_cache": LoadTimes((1.0,))}
    results = build_results({}, {}, RUNS, 64, load, [], "pagewire bench lora")
    assert [row["num_adapters"] for row in results["throughput"]] == [0, 8, 32]
    assert results["throughput"][2]["ratio_to_base"] == 0.625
    assert results["load_ms"]["executor_cold"] == {"median_ms": 6.0, "max_ms": 7.0, "count": 3}
    table = markdown_table(results)
    assert "| base model | 512.0 | 1.00x | 1.00x, 1.00x | n/a |" in table
    assert "| 32 | 320.0 | 0.62x | 0.62x, 0.62x | 60/64 |" in table
    assert "| 8 | 455.1 | 0.89x | 0.89x | 50/64 |" in table
    assert "| 6.0 | 7.0 |" in table and "LoadAdapter RPC" not in table
    assert "| **no** |" in table and "SGMV" not in table


def test_config_and_flags():
    argv = ["bench", "lora", "--adapters", "32,0,8", "--rounds", "1", "--model-preset", "tiny"]
    args = build_parser().parse_args(argv)
    config = config_from_args(args)
    assert config.adapter_counts == (0, 8, 32) and config.rounds == 1 and config.model == TINY_MODEL
    assert config.max_loras == 32
    assert config.executor_args[-5:] == ["--enable-lora", "--max-loras", "32", "--max-lora-rank", "16"]
    assert "--enable-lora" in config.scheduler_args
    assert len(config.requests()) == 64 and {r.max_tokens for r in config.requests()} == {64}
    assert LoraBenchConfig(adapter_counts=(0,)).max_loras == 1
    with pytest.raises(ValueError, match="needs 0"):
        LoraBenchConfig(adapter_counts=(1, 8))
    with pytest.raises(ValueError, match="comma-separated"):
        parse_counts("1,x")


def test_micro_benchmark_segments_merge_neighbouring_rows_of_one_slot():
    segments = SgmvCase("c", ((3, 0), (2, 0), (1, 5), (4, 1))).segments()
    assert segments.starts_cpu == (0, 5, 6, 10) and segments.slot_ids_cpu == (0, 5, 1)
    spread = decode_case(6, 4).segments()
    assert spread.slot_ids_cpu == (0, 1, 2, 3, 0, 1) and spread.starts_cpu == tuple(range(7))


def test_written_adapters_are_accepted_by_the_scheduler_and_the_executor(tmp_path: Path):
    from executor_service.lora.lora_weights import read_lora_weights
    from executor_service.model.config import ModelConfig
    from scheduler_service.lora.adapter_files import inspect_adapter

    model_dir = create_bench_model(tmp_path / "model", TINY_MODEL)
    adapter_dir = write_bench_adapter(model_dir, tmp_path / "a", rank=16, seed=3)
    model = ModelConfig.from_pretrained_dir(model_dir)
    weights = read_lora_weights(adapter_dir, model, 16)
    assert weights.config.rank == 16 and set(weights.config.target_modules) == set(LORA_TARGET_MODULES)
    assert weights.config.scaling == 2.0
    assert len(weights.lora_a) == len(weights.lora_b) == TINY_MODEL.num_layers * 7
    spec = inspect_adapter(str(adapter_dir), model, 16)
    assert spec.rank == 16 and set(spec.target_modules) == set(LORA_TARGET_MODULES)
    again = write_bench_adapter(model_dir, tmp_path / "b", rank=16, seed=3)
    assert read_lora_weights(again, model, 16).lora_a[(0, "q_proj")].equal(weights.lora_a[(0, "q_proj")])
