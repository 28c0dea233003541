"""The comparison's figures: ratios, roofline fractions, memory, overhead and targets (compare.json)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from benchmarks.bench_model import describe
from benchmarks.kv_memory import KVWaste, contiguous_capacity, paged_capacity
from benchmarks.overhead import OverheadPoint
from benchmarks.roofline import workload_flops
from benchmarks.system_run import HF_GENERATE, HF_GENERATE_BATCH, PAGEWIRE, VLLM_CPU, SystemRun
from benchmarks.workloads import BenchRequest

if TYPE_CHECKING:
    from benchmarks.compare import CompareConfig

COMPARE_SCHEMA = "pagewire.bench.compare/v1"
SYSTEMS = (PAGEWIRE, HF_GENERATE, HF_GENERATE_BATCH, VLLM_CPU)
# The systems pagewire is compared with: ratios and greedy-token equality are against each.
OTHERS = SYSTEMS[1:]
OVERHEAD_TARGET_RUNNING = 64
# pagewire over vLLM's CPU build on A and B: the target, and the floor it must never fall below.
VLLM_TARGET = 1.2
VLLM_FLOOR = 1.0


@dataclass(slots=True)
class CompareMeasurements:
    """Everything a comparison measured, filled in phase by phase."""

    machine: dict[str, Any]
    peak_flops: dict[int, float] = field(default_factory=dict)
    runs: list[SystemRun] = field(default_factory=list)
    # Serving metrics of pagewire's gRPC runs, keyed "runs[i]" after the run they belong to.
    serve_metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    kv_waste: KVWaste | None = None
    overhead: list[OverheadPoint] = field(default_factory=list)
    overhead_threads: int | None = None
    abandoned: list[str] = field(default_factory=list)
    # vLLM's version, start-ups and settings (VllmPeers.describe()), when it ran.
    vllm: dict[str, Any] | None = None
    wall_s: float = 0.0


def machine_peak_flops(peak_flops: dict[int, float], num_cpus: int | None) -> float:
    """The machine's fp32 bound: the best measured rate per thread times the CPU count (ideal scaling),
    or the best measured rate if higher. Per-thread scaling keeps the bound honest when other processes
    made a many-thread measurement slow."""
    per_thread = max(peak / num_threads for num_threads, peak in peak_flops.items())
    return max(per_thread * (num_cpus or max(peak_flops)), max(peak_flops.values()))


def _best_runs(runs: Sequence[SystemRun]) -> dict[str, dict[str, SystemRun]]:
    """workload -> system -> its fastest run (over thread counts)."""
    best: dict[str, dict[str, SystemRun]] = {}
    for run in runs:
        current = best.setdefault(run.workload, {}).get(run.system)
        if current is None or run.output_tokens_per_s > current.output_tokens_per_s:
            best[run.workload][run.system] = run
    return best


def _num_equal(a: SystemRun | None, b: SystemRun | None) -> str | None:
    if a is None or b is None or not a.outputs or not b.outputs:
        return None
    return f"{sum(x == y for x, y in zip(a.outputs, b.outputs))}/{len(a.outputs)}"


def _ratio(best: dict[str, SystemRun], over: str) -> float | None:
    if PAGEWIRE not in best or over not in best:
        return None
    return best[PAGEWIRE].output_tokens_per_s / best[over].output_tokens_per_s


def _target(
    name: str, target: str, value: float | None, met: bool | None, floor_met: bool | None = None
) -> dict[str, Any]:
    """`floor_met`: for a target with a floor below it, whether the floor was reached."""
    row = {"name": name, "target": target, "value": value, "met": met}
    return row if floor_met is None else {**row, "floor_met": floor_met}


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    ratios, memory = results["ratios"], results["memory"]
    fraction = results["best"].get("A", {}).get(PAGEWIRE, {}).get("roofline_fraction")
    overhead = {p["num_running"]: p for p in results["overhead"]["points"]}.get(OVERHEAD_TARGET_RUNNING)
    outside = overhead["outside_forward_ms"] if overhead else None

    def at_least(value: float | None, bound: float) -> bool | None:
        return None if value is None else value >= bound

    vllm_ratios = {workload: ratios[workload].get(f"{PAGEWIRE}/{VLLM_CPU}") for workload in ("A", "B")}
    vllm = [
        _target(
            f"{workload}: pagewire / vLLM",
            f">= {VLLM_TARGET}x (floor {VLLM_FLOOR}x)",
            ratio,
            at_least(ratio, VLLM_TARGET),
            at_least(ratio, VLLM_FLOOR),
        )
        for workload, ratio in vllm_ratios.items()
    ]
    return [
        _target(
            "A: pagewire / static generate",
            ">= 1.3x",
            ratios["A"].get(f"{PAGEWIRE}/{HF_GENERATE}"),
            at_least(ratios["A"].get(f"{PAGEWIRE}/{HF_GENERATE}"), 1.3),
        ),
        _target(
            "A: pagewire / generate_batch",
            ">= 1.8x",
            ratios["A"].get(f"{PAGEWIRE}/{HF_GENERATE_BATCH}"),
            at_least(ratios["A"].get(f"{PAGEWIRE}/{HF_GENERATE_BATCH}"), 1.8),
        ),
        _target("A: pagewire fraction of roofline", ">= 70%", fraction, at_least(fraction, 0.70)),
        _target(
            "B: pagewire / static generate",
            ">= 2x",
            ratios["B"].get(f"{PAGEWIRE}/{HF_GENERATE}"),
            at_least(ratios["B"].get(f"{PAGEWIRE}/{HF_GENERATE}"), 2.0),
        ),
        _target(
            "KV waste over workload A",
            "< 4%",
            memory["waste_fraction"],
            None if memory["waste_fraction"] is None else memory["waste_fraction"] < 0.04,
        ),
        _target(
            "sequences held vs contiguous max_model_len",
            ">= 3x",
            memory["capacity_ratio_a"],
            at_least(memory["capacity_ratio_a"], 3.0),
        ),
        _target(
            f"time outside forward at {OVERHEAD_TARGET_RUNNING} running",
            "<= 1 ms",
            outside,
            None if outside is None else outside <= 1.0,
        ),
        *(vllm if results["vllm"] is not None else []),
    ]


def _memory(
    config: CompareConfig, workloads: dict[str, list[BenchRequest]], waste: KVWaste | None
) -> dict[str, Any]:
    num_slots = config.num_kv_blocks * config.block_size
    max_model_len = config.model.max_position_embeddings
    contiguous = contiguous_capacity(num_slots, max_model_len)
    paged = {
        name: paged_capacity(
            [len(r.prompt_token_ids) + r.max_tokens for r in requests],
            config.num_kv_blocks,
            config.block_size,
        )
        for name, requests in workloads.items()
    }
    return {
        "kv_pool_bytes": num_slots * config.model.kv_bytes_per_token,
        "num_kv_blocks": config.num_kv_blocks,
        "block_size": config.block_size,
        "max_model_len": max_model_len,
        "waste_fraction": None if waste is None else waste.waste_fraction,
        "kv_waste": None if waste is None else asdict(waste),
        "paged_capacity": paged,
        "contiguous_capacity": contiguous,
        "capacity_ratio_a": paged["A"] / contiguous if contiguous else None,
        "capacity_ratio_b": paged["B"] / contiguous if contiguous else None,
    }


def build_results(
    config: CompareConfig, workloads: dict[str, list[BenchRequest]], m: CompareMeasurements, command: str
) -> dict[str, Any]:
    """The compare.json document."""
    machine_peak = machine_peak_flops(m.peak_flops, m.machine.get("num_cpus"))
    flops = {name: workload_flops(config.model, requests) for name, requests in workloads.items()}
    # Output tokens/s a run would reach doing only useful work at the machine's peak FLOP/s.
    bound = {
        name: machine_peak / flops[name] * sum(r.max_tokens for r in workloads[name]) for name in workloads
    }

    def summary(run: SystemRun) -> dict[str, Any]:
        achieved = flops[run.workload] / run.duration_s
        return {
            **run.summary(),
            "roofline_fraction": achieved / machine_peak,
            "fraction_of_matmul_peak_at_its_threads": achieved / m.peak_flops[run.num_threads]
            if run.num_threads in m.peak_flops
            else None,
        }

    runs = [summary(run) for run in m.runs]
    best = _best_runs(m.runs)
    results: dict[str, Any] = {
        "schema": COMPARE_SCHEMA,
        "command": command,
        "wall_s": round(m.wall_s, 1),
        "machine": m.machine,
        "config": {
            **{k: v for k, v in asdict(config).items() if k not in ("model", "hf_batching")},
            "model": describe(config.model),
            "hf_generate_batch": asdict(config.hf_batching),
        },
        "abandoned_runs": m.abandoned,
        "vllm": m.vllm,
        "roofline": {
            "peak_flops_per_s_by_threads": {str(k): v for k, v in m.peak_flops.items()},
            "machine_peak_flops_per_s": machine_peak,
            "workload_flops": flops,
            "bound_output_tokens_per_s": bound,
        },
        "runs": runs,
        "best": {
            workload: {system: summary(run) for system, run in systems.items()}
            for workload, systems in best.items()
        },
        "ratios": {
            workload: {
                f"{PAGEWIRE}/{other}": ratio
                for other in OTHERS
                if (ratio := _ratio(best.get(workload, {}), other)) is not None
            }
            for workload in workloads
        },
        "greedy_outputs_equal": {
            f"{workload}: {PAGEWIRE} vs {other}": _num_equal(systems.get(PAGEWIRE), systems.get(other))
            for workload, systems in best.items()
            for other in OTHERS
            if other in systems
        },
        "pagewire_serve_metrics": m.serve_metrics,
        "memory": _memory(config, workloads, m.kv_waste),
        "overhead": {"num_threads": m.overhead_threads, "points": [asdict(p) for p in m.overhead]},
    }
    results["targets"] = _targets(results)
    return results
