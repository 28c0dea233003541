"""The benchmarks end to end: `bench compare` on a 2-request workload, `bench serve` against a real server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.compare_markdown import README_BEGIN, README_END
from executor_service.tiny_model import create_tiny_model
from pagewire.cli import main
from tests.helpers.processes import running_server


def test_compare_runs_every_system_on_a_two_request_workload(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Benchmarks\n\n{README_BEGIN}\n{README_END}\n")
    code = main(
        [
            "bench",
            "compare",
            "--model-preset",
            "tiny",
            "--num-requests",
            "2",
            "--threads",
            "1",
            "--overhead-sizes",
            "1,2",
            "--output-dir",
            str(tmp_path / "results"),
            "--readme",
            str(readme),
        ]
    )
    assert code == 0
    results = json.loads((tmp_path / "results" / "compare.json").read_text())
    ran = sorted((r["system"], r["workload"], r["num_threads"]) for r in results["runs"])
    assert ran == [
        ("hf-generate", "A", 1),
        ("hf-generate", "B", 1),
        ("hf-generate-batch", "A", 1),
        ("pagewire", "A", 1),
        ("pagewire", "B", 1),
    ]
    for run in results["runs"]:
        expected = 2 * 64 if run["workload"] == "A" else None
        assert run["output_tokens_per_s"] > 0 and (expected is None or run["num_output_tokens"] == expected)
    # Greedy decoding on the same weights: pagewire's tokens equal transformers', request by request.
    assert set(results["greedy_outputs_equal"].values()) == {"2/2"}
    assert set(results["ratios"]["A"]) == {"pagewire/hf-generate", "pagewire/hf-generate-batch"}
    assert [p["num_running"] for p in results["overhead"]["points"]] == [1, 2]
    assert all(p["plan_bytes"] > 0 and p["outside_forward_ms"] > 0 for p in results["overhead"]["points"])
    memory = results["memory"]
    assert 0 < memory["waste_fraction"] < 1 and memory["kv_waste"]["max_partial_blocks_per_sequence"] < 1
    assert memory["contiguous_capacity"] == 16 and memory["paged_capacity"]["A"] > 16
    assert len(results["targets"]) == 7
    table = (tmp_path / "results" / "compare.md").read_text()
    assert "| hf-generate-batch | 1 |" in table
    assert table.strip() in readme.read_text()


def test_serve_benchmark_caps_concurrency_counts_cache_hits_and_writes_json_and_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model_dir = create_tiny_model(tmp_path / "tiny", seed=0)
    json_path, plot_path, prefix_path = (
        tmp_path / "serve.json",
        tmp_path / "serve.png",
        tmp_path / "prefix.json",
    )
    with running_server(model_dir) as address:
        code = main(
            [
                "bench",
                "serve",
                "--address",
                address,
                "--num-prompts",
                "6",
                "--input-len",
                "8:40",
                "--output-len",
                "5:9",
                "--request-rate",
                "50",
                "--max-concurrency",
                "2",
                "--ignore-eos",
                "--json",
                str(json_path),
                "--plot",
                str(plot_path),
                "--no-progress",
            ]
        )
        assert code == 0
        # One request at a time: every request after the first finds the 48-token (3-block) prefix cached.
        code = main(
            [
                "bench",
                "serve",
                "--address",
                address,
                "--dataset",
                "shared-prefix",
                "--prefix-len",
                "48",
                "--input-len",
                "5:9",
                "--output-len",
                "4",
                "--num-prompts",
                "4",
                "--max-concurrency",
                "1",
                "--ignore-eos",
                "--json",
                str(prefix_path),
                "--no-progress",
            ]
        )
        assert code == 0
    content = json.loads(json_path.read_text())
    requests = content["requests"]
    assert len(requests) == 6 and all(r["success"] for r in requests)
    assert all(5 <= r["num_output_tokens"] <= 9 and 8 <= r["num_prompt_tokens"] <= 40 for r in requests)
    assert content["metrics"]["total_output_tokens"] == sum(r["num_output_tokens"] for r in requests)
    events = sorted([(r["send_time_s"], 1) for r in requests] + [(r["end_time_s"], -1) for r in requests])
    in_flight = 0
    for _, change in events:
        in_flight += change
        assert in_flight <= 2
    assert content["server"]["vocab_size"] == 260
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prefix = json.loads(prefix_path.read_text())
    assert [r["num_cached_prompt_tokens"] for r in prefix["requests"]] == [0, 48, 48, 48]
    assert prefix["metrics"]["cached_prompt_tokens"] == 144
