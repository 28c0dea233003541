"""The benchmark's outputs: the serve JSON schema, the summary table, the comparison's figures and README."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench_model import BenchModelConfig
from benchmarks.compare import CompareConfig
from benchmarks.compare_markdown import README_BEGIN, README_END, markdown_report, update_readme
from benchmarks.compare_report import CompareMeasurements, build_results, machine_peak_flops
from benchmarks.kv_memory import KVWaste
from benchmarks.metrics import RequestRecord, compute_metrics
from benchmarks.overhead import OverheadPoint
from benchmarks.report import SERVE_SCHEMA, format_summary, serve_result, write_json
from benchmarks.roofline import workload_flops
from benchmarks.system_run import HF_GENERATE, HF_GENERATE_BATCH, PAGEWIRE, VLLM_CPU, SystemRun
from benchmarks.workloads import BenchRequest, LengthRange

REQUEST_KEYS = {
    "index",
    "success",
    "error",
    "num_prompt_tokens",
    "num_cached_prompt_tokens",
    "num_output_tokens",
    "send_time_s",
    "end_time_s",
    "ttft_ms",
    "tpot_ms",
    "e2e_latency_ms",
    "itl_ms",
    "chunk_times_s",
    "chunk_num_tokens",
}
LATENCY_KEYS = {"mean_ms", "median_ms", "p99_ms", "num_samples"}


def records() -> list[RequestRecord]:
    return [
        RequestRecord(
            0, 0.0, 0.4, (0.1, 0.2, 0.4), (1, 1, 1), num_prompt_tokens=20, num_cached_prompt_tokens=16
        ),
        RequestRecord(1, 0.05, 0.3, (0.3,), (1,), num_prompt_tokens=9, error="ABORTED: the server aborted"),
    ]


def test_serve_json_holds_every_per_request_figure(tmp_path: Path) -> None:
    metrics = compute_metrics(records(), duration_s=0.4)
    path = write_json(
        tmp_path / "out" / "serve.json", serve_result({"seed": 0}, {"model_name": "m"}, records(), metrics)
    )
    content = json.loads(path.read_text())
    assert set(content) == {
        "schema",
        "config",
        "server",
        "metrics",
        "output_throughput_over_time",
        "requests",
    }
    assert content["schema"] == SERVE_SCHEMA and content["config"] == {"seed": 0}
    assert {"ttft", "tpot", "itl", "e2e_latency"} <= set(content["metrics"])
    assert set(content["metrics"]["ttft"]) == LATENCY_KEYS
    assert content["metrics"]["num_completed"] == 1 and content["metrics"]["cached_prompt_fraction"] == 0.8
    assert [set(r) for r in content["requests"]] == [REQUEST_KEYS, REQUEST_KEYS]
    first = content["requests"][0]
    assert first["ttft_ms"] == pytest.approx(100.0) and first["itl_ms"] == pytest.approx([100.0, 200.0])
    assert first["tpot_ms"] == pytest.approx(150.0) and first["num_output_tokens"] == 3
    assert content["requests"][1]["success"] is False
    assert content["output_throughput_over_time"] == [[0.0, 3.0]]


def test_summary_table_reports_throughputs_latencies_and_cache_hits() -> None:
    table = format_summary(compute_metrics(records(), duration_s=0.4))
    lines = table.splitlines()
    assert "Successful requests:" in lines[1] and lines[1].endswith(" 1")
    assert any(line.startswith("Prompt tokens from cache:") and line.endswith(" 16") for line in lines)
    assert any(
        line.startswith("Output token throughput (tok/s):") and line.endswith("7.50") for line in lines
    )
    assert any(line.startswith("Median TTFT (ms):") and line.endswith("100.00") for line in lines)
    assert len(lines) < 40


def small_config() -> CompareConfig:
    model = BenchModelConfig(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=4,
        num_kv_heads=2,
        intermediate_size=128,
        vocab_size=512,
        max_position_embeddings=2048,
    )
    return CompareConfig(model=model, num_requests=4, thread_counts=(1, 2), num_kv_blocks=64)


def workloads() -> dict[str, list[BenchRequest]]:
    return {
        "A": [BenchRequest(4, prompt_token_ids=(1,) * 20), BenchRequest(4, prompt_token_ids=(2,) * 40)],
        "B": [BenchRequest(2, prompt_token_ids=(1,) * 20), BenchRequest(30, prompt_token_ids=(2,) * 40)],
    }


def measurements() -> CompareMeasurements:
    outputs = ((5, 6, 7, 8), (1, 2, 3, 4))
    m = CompareMeasurements(
        machine={
            "cpu": "test cpu",
            "num_cpus": 2,
            "memory_gib": 1.0,
            "torch": "t",
            "transformers": "x",
            "python": "3",
            "load_average_at_start": 0.5,
        }
    )
    m.peak_flops = {1: 1e9, 2: 4e9}
    m.runs = [
        SystemRun(PAGEWIRE, "A", 1, 2.0, 60, 8, outputs),
        SystemRun(PAGEWIRE, "A", 2, 1.0, 60, 8, outputs),
        SystemRun(HF_GENERATE, "A", 1, 4.0, 60, 8, ((5, 6, 7, 8), (1, 2, 3, 0))),
        SystemRun(HF_GENERATE_BATCH, "A", 2, 2.0, 60, 8, outputs),
        SystemRun(PAGEWIRE, "B", 2, 1.0, 60, 32),
        SystemRun(HF_GENERATE, "B", 1, 8.0, 60, 32),
    ]
    m.kv_waste = KVWaste(10, 1000, 970, 64, 60, 0.5)
    m.overhead = [OverheadPoint(64, 5, 20.0, 18.0, 2.5, 1.0, 0.5, 0.2, 0.1, 0.7, 0.05, 392)]
    m.overhead_threads = 2
    return m


def test_compare_results_ratios_roofline_memory_and_targets() -> None:
    config = small_config()
    results = build_results(config, workloads(), measurements(), "pagewire bench compare --threads 1,2")
    assert results["best"]["A"][PAGEWIRE]["num_threads"] == 2
    assert results["ratios"]["A"] == {
        f"{PAGEWIRE}/{HF_GENERATE}": 4.0,
        f"{PAGEWIRE}/{HF_GENERATE_BATCH}": 2.0,
    }
    assert results["ratios"]["B"] == {f"{PAGEWIRE}/{HF_GENERATE}": 8.0}
    bound_a = 4e9 / workload_flops(config.model, workloads()["A"]) * 8
    assert results["roofline"]["bound_output_tokens_per_s"]["A"] == pytest.approx(bound_a)
    assert results["best"]["A"][PAGEWIRE]["roofline_fraction"] == pytest.approx(8.0 / bound_a)
    assert results["greedy_outputs_equal"] == {
        f"A: {PAGEWIRE} vs {HF_GENERATE}": "1/2",
        f"A: {PAGEWIRE} vs {HF_GENERATE_BATCH}": "2/2",
        f"B: {PAGEWIRE} vs {HF_GENERATE}": None,
    }
    memory = results["memory"]
    # A needs 2 and 3 blocks per pair (25 fit in 64 blocks), B 2 and 5 (18 fit); no 2048-token sequence fits.
    assert memory["paged_capacity"] == {"A": 25, "B": 18} and memory["contiguous_capacity"] == 0
    assert memory["waste_fraction"] == pytest.approx(0.03)
    met = {t["name"]: t["met"] for t in results["targets"]}
    assert met["A: pagewire / static generate"] is True and met["A: pagewire / generate_batch"] is True
    assert met["B: pagewire / static generate"] is True and met["KV waste over workload A"] is True
    assert met["time outside forward at 64 running"] is False
    assert met["sequences held vs contiguous max_model_len"] is None
    json.dumps(results)


def test_markdown_report_has_every_table() -> None:
    report = markdown_report(build_results(small_config(), workloads(), measurements(), "cmd"))
    assert "Command: `cmd`" in report
    assert "| pagewire | 2 | 8.0 | 1.00x |" in report
    assert "| hf-generate | 1 | 2.0 | 4.00x |" in report
    assert "| 64 | 20.00 | 18.00 | 2.50 |" in report
    assert "| time outside forward at 64 running | <= 1 ms | 2.50 ms | **no** |" in report
    assert "| KV waste over workload A | < 4% | 3.0% | yes |" in report


def test_vllm_rows_ratios_equality_and_targets_with_their_floor() -> None:
    m = measurements()
    m.runs += [
        SystemRun(VLLM_CPU, "A", 1, 1.5, 60, 8, ((5, 6, 7, 8), (1, 2, 3, 4))),
        SystemRun(VLLM_CPU, "A", 2, 1.1, 60, 8, ((5, 6, 7, 8), (1, 2, 3, 4))),
        SystemRun(VLLM_CPU, "B", 2, 0.8, 60, 32),
    ]
    m.vllm = {
        "version": "0.32.0",
        "startup_s_by_threads": {"1": 77.0, "2": 70.4},
        "settings": {"block_size": 32, "kv_cache_bytes": 512 * 1024**2},
    }
    results = build_results(small_config(), workloads(), m, "cmd")
    assert results["vllm"] == m.vllm
    assert results["ratios"]["A"][f"{PAGEWIRE}/{VLLM_CPU}"] == pytest.approx(1.1)
    assert results["ratios"]["B"][f"{PAGEWIRE}/{VLLM_CPU}"] == pytest.approx(0.8)
    assert results["greedy_outputs_equal"][f"A: {PAGEWIRE} vs {VLLM_CPU}"] == "2/2"
    assert results["greedy_outputs_equal"][f"B: {PAGEWIRE} vs {VLLM_CPU}"] is None
    vllm_targets = [t for t in results["targets"] if "vLLM" in t["name"]]
    assert vllm_targets == [
        {
            "name": "A: pagewire / vLLM",
            "target": ">= 1.2x (floor 1.0x)",
            "value": pytest.approx(1.1),
            "met": False,
            "floor_met": True,
        },
        {
            "name": "B: pagewire / vLLM",
            "target": ">= 1.2x (floor 1.0x)",
            "value": pytest.approx(0.8),
            "met": False,
            "floor_met": False,
        },
    ]
    report = markdown_report(results)
    assert "| vllm-cpu | 2 | 7.3 | 1.10x |" in report
    assert "| vllm-cpu | A | 1 | 1.50 | 5.3 | 45.3 |" in report
    assert "| A: pagewire / vLLM | >= 1.2x (floor 1.0x) | 1.10x | **no** (floor met) |" in report
    assert "| B: pagewire / vLLM | >= 1.2x (floor 1.0x) | 0.80x | **no** |" in report
    assert "vLLM: vllm-cpu 0.32.0, offline `LLM.generate`" in report
    assert "512 MiB KV cache in 32-token blocks" in report
    assert "start-up (not counted) 77 s with 1 thread, 70 s with 2 threads." in report
    assert f"A: {PAGEWIRE} vs {VLLM_CPU}: 2/2" in report


def test_without_vllm_there_are_no_vllm_rows() -> None:
    results = build_results(small_config(), workloads(), measurements(), "cmd")
    assert results["vllm"] is None and len(results["targets"]) == 7
    assert "vllm" not in markdown_report(results).lower()


def test_update_readme_replaces_only_the_marked_block(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Bench\n\nintro\n\n{README_BEGIN}\nold table\n{README_END}\n\n## Kernels\nkept\n")
    update_readme(readme, "new table")
    assert (
        readme.read_text()
        == f"# Bench\n\nintro\n\n{README_BEGIN}\nnew table\n{README_END}\n\n## Kernels\nkept\n"
    )
    fresh = tmp_path / "other.md"
    fresh.write_text("# Other\n")
    update_readme(fresh, "t")
    assert fresh.read_text() == f"# Other\n\n{README_BEGIN}\nt\n{README_END}\n"


def test_length_ranges_of_the_standard_comparison() -> None:
    config = CompareConfig()
    assert (config.prompt_len, config.output_len_a, config.output_len_b) == (
        LengthRange(32, 256),
        LengthRange(64, 64),
        LengthRange(16, 256),
    )
    assert config.model == BenchModelConfig(8, 512, 8, 4, 1408, 32000, 2048)
    a, b = config.workloads()["A"], config.workloads()["B"]
    assert len(a) == len(b) == 64 and [r.prompt_token_ids for r in a] == [r.prompt_token_ids for r in b]


def test_machine_bound_scales_the_best_per_thread_rate_to_every_cpu() -> None:
    assert machine_peak_flops({1: 150.0, 2: 200.0}, num_cpus=2) == 300.0
    assert machine_peak_flops({1: 100.0, 2: 250.0}, num_cpus=2) == 250.0
    assert machine_peak_flops({1: 100.0}, num_cpus=None) == 100.0
