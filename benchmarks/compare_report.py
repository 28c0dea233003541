"""The comparison's figures: ratios, roofline fractions, memory, overhead and targets; JSON and markdown."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.bench_model import describe
from benchmarks.kv_memory import KVWaste, contiguous_capacity, paged_capacity
from benchmarks.overhead import OverheadPoint
from benchmarks.roofline import workload_flops
from benchmarks.system_run import HF_GENERATE, HF_GENERATE_BATCH, PAGEWIRE, SystemRun
from benchmarks.workloads import BenchRequest

if TYPE_CHECKING:
    from benchmarks.compare import CompareConfig

COMPARE_SCHEMA = "pagewire.bench.compare/v1"
README_BEGIN = "<!-- bench-compare:begin -->"
README_END = "<!-- bench-compare:end -->"
SYSTEMS = (PAGEWIRE, HF_GENERATE, HF_GENERATE_BATCH)
OVERHEAD_TARGET_RUNNING = 64


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


def _target(name: str, target: str, value: float | None, met: bool | None) -> dict[str, Any]:
    return {"name": name, "target": target, "value": value, "met": met}


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    ratios, memory = results["ratios"], results["memory"]
    fraction = results["best"].get("A", {}).get(PAGEWIRE, {}).get("roofline_fraction")
    overhead = {p["num_running"]: p for p in results["overhead"]["points"]}.get(OVERHEAD_TARGET_RUNNING)
    outside = overhead["outside_forward_ms"] if overhead else None

    def at_least(value: float | None, bound: float) -> bool | None:
        return None if value is None else value >= bound

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
                for other in (HF_GENERATE, HF_GENERATE_BATCH)
                if (ratio := _ratio(best.get(workload, {}), other)) is not None
            }
            for workload in workloads
        },
        "greedy_outputs_equal": {
            f"{workload}: {PAGEWIRE} vs {other}": _num_equal(systems.get(PAGEWIRE), systems.get(other))
            for workload, systems in best.items()
            for other in (HF_GENERATE, HF_GENERATE_BATCH)
            if other in systems
        },
        "pagewire_serve_metrics": m.serve_metrics,
        "memory": _memory(config, workloads, m.kv_waste),
        "overhead": {"num_threads": m.overhead_threads, "points": [asdict(p) for p in m.overhead]},
    }
    results["targets"] = _targets(results)
    return results


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:.{digits}f}{suffix}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _header(*cells: str) -> list[str]:
    return [_row(*cells), _row(*["---"] * len(cells))]


def _throughput_lines(results: dict[str, Any]) -> list[str]:
    best = results["best"]
    pagewire_a = best["A"].get(PAGEWIRE, {}).get("output_tokens_per_s")
    pagewire_b = best.get("B", {}).get(PAGEWIRE, {}).get("output_tokens_per_s")

    def speedup(pagewire: float | None, run: dict[str, Any] | None) -> str:
        return _fmt(pagewire / run["output_tokens_per_s"] if pagewire and run else None, 2, "x")

    lines = _header(
        "system",
        "threads",
        "A: output tok/s",
        "A: pagewire is",
        "A: of roofline",
        "B: output tok/s",
        "B: pagewire is",
    )
    for system in SYSTEMS:
        a, b = best.get("A", {}).get(system), best.get("B", {}).get(system)
        if a is None and b is None:
            continue
        lines.append(
            _row(
                system,
                (a or b)["num_threads"],
                _fmt(a and a["output_tokens_per_s"]),
                speedup(pagewire_a, a),
                _pct(a and a["roofline_fraction"]),
                _fmt(b and b["output_tokens_per_s"]),
                speedup(pagewire_b, b),
            )
        )
    return lines


def _run_lines(results: dict[str, Any]) -> list[str]:
    lines = ["Every run, in order (on B, each system at its best thread count on A):", ""]
    lines += _header(
        "system",
        "workload",
        "threads",
        "duration s",
        "output tok/s",
        "total tok/s",
        "of roofline",
        "of matmul peak at its threads",
    )
    for run in results["runs"]:
        lines.append(
            _row(
                run["system"],
                run["workload"],
                run["num_threads"],
                f"{run['duration_s']:.2f}",
                f"{run['output_tokens_per_s']:.1f}",
                f"{run['total_tokens_per_s']:.1f}",
                _pct(run["roofline_fraction"]),
                _pct(run["fraction_of_matmul_peak_at_its_threads"]),
            )
        )
    return lines + [f"\nAbandoned: {reason}." for reason in results["abandoned_runs"]]


def _roofline_lines(results: dict[str, Any]) -> list[str]:
    roofline, num_cpus = results["roofline"], results["machine"]["num_cpus"]
    peaks = ", ".join(
        f"{k} threads {v / 1e9:.1f}" for k, v in roofline["peak_flops_per_s_by_threads"].items()
    )
    work, bound = roofline["workload_flops"], roofline["bound_output_tokens_per_s"]
    equal = ", ".join(f"{k}: {v}" for k, v in results["greedy_outputs_equal"].items())
    return [
        f"Roofline: measured fp32 matmul peak GFLOP/s: {peaks}; machine bound (best per-thread rate x "
        f"{num_cpus} CPUs) {roofline['machine_peak_flops_per_s'] / 1e9:.1f}. Useful work: A "
        f"{work['A'] / 1e9:.4g} GFLOP, B {work['B'] / 1e9:.4g} GFLOP; at the bound that is "
        f"{bound['A']:.0f} (A) and {bound['B']:.0f} (B) output tok/s.",
        "",
        f"Greedy outputs equal, request by request: {equal}.",
    ]


def _memory_lines(memory: dict[str, Any]) -> list[str]:
    waste = memory["kv_waste"]
    return [
        f"Memory (KV pool of {memory['num_kv_blocks']} blocks x {memory['block_size']} tokens, "
        f"{memory['kv_pool_bytes'] / 1024**2:.0f} MiB):",
        "",
        *_header("measure", "value"),
        _row("KV slots allocated but empty, over workload A's steps", _pct(memory["waste_fraction"])),
        _row(
            "worst step: unused slots per running sequence, in blocks",
            _fmt(waste and waste["max_partial_blocks_per_sequence"], 2),
        ),
        _row("sequences of A held at once, paged", memory["paged_capacity"]["A"]),
        _row("sequences of B held at once, paged", memory["paged_capacity"]["B"]),
        _row(
            f"sequences held, contiguous max_model_len {memory['max_model_len']}",
            memory["contiguous_capacity"],
        ),
        _row(
            "paged / contiguous (A, B)",
            f"{_fmt(memory['capacity_ratio_a'], 1, 'x')}, {_fmt(memory['capacity_ratio_b'], 1, 'x')}",
        ),
    ]


def _overhead_lines(overhead: dict[str, Any]) -> list[str]:
    lines = [
        f"Per-step overhead, decode-only steps, {overhead['num_threads']} executor threads (medians, ms):",
        "",
        *_header(
            "running",
            "step",
            "forward",
            "outside forward",
            "sampling",
            "executor other",
            "input prep",
            "executor idle",
            "scheduler CPU",
            "plan encode",
            "plan bytes",
        ),
    ]
    for p in overhead["points"]:
        times = (
            "wall_ms",
            "forward_ms",
            "outside_forward_ms",
            "sampling_ms",
            "executor_other_ms",
            "input_prep_ms",
            "executor_idle_ms",
            "scheduler_ms",
        )
        lines.append(
            _row(
                p["num_running"],
                *(f"{p[k]:.2f}" for k in times),
                f"{p['plan_encode_ms']:.3f}",
                p["plan_bytes"],
            )
        )
    return lines


def _shown(value: float | None, target: str) -> str:
    if value is None:
        return "n/a"
    if "%" in target:
        return _pct(value)
    return f"{value:.2f} ms" if "ms" in target else f"{value:.2f}x"


def _target_lines(targets: list[dict[str, Any]]) -> list[str]:
    lines = _header("target", "wanted", "measured", "met")
    for t in targets:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(_row(t["name"], t["target"], _shown(t["value"], t["target"]), met))
    return lines


def markdown_report(results: dict[str, Any]) -> str:
    """The tables benchmarks/README.md shows, from a compare.json document."""
    machine = results["machine"]
    sections = [
        [
            f"Machine: {machine['cpu']}, {machine['num_cpus']} CPUs, {machine['memory_gib']} GiB; torch "
            f"{machine['torch']}, transformers {machine['transformers']}, Python {machine['python']}. "
            f"Load average {machine['load_average_at_start']} at start, {machine.get('load_average_at_end')} "
            f"at end; the run took {results['wall_s']} s.",
            "",
            f"Command: `{results['command']}`",
        ],
        _throughput_lines(results),
        _run_lines(results),
        _roofline_lines(results),
        _memory_lines(results["memory"]),
        _overhead_lines(results["overhead"]),
        _target_lines(results["targets"]),
    ]
    return "\n\n".join("\n".join(section) for section in sections)


def update_readme(path: Path, report: str) -> None:
    """Replaces the text between README_BEGIN and README_END in `path` (appending both when absent)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    block = f"{README_BEGIN}\n{report}\n{README_END}"
    if README_BEGIN in text and README_END in text:
        head, rest = text.split(README_BEGIN, 1)
        text = head + block + rest.split(README_END, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text, encoding="utf-8")
