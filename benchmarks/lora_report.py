"""`pagewire bench lora`'s figures: throughput per adapter count against the base model, load times,
the issue's targets, and the markdown table (pure: no processes, no tensors)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Issue 11's targets: 32 distinct adapters at >= 0.8x the base model's output tokens/s on CPU; a cold
# load of a rank-16 adapter of the bench model under 100 ms.
THROUGHPUT_TARGET_ADAPTERS = 32
THROUGHPUT_TARGET_RATIO = 0.8
COLD_LOAD_TARGET_MS = 100.0


def adapter_name(index: int) -> str:
    return f"lora{index:02d}"


def adapters_for_requests(num_adapters: int, num_requests: int) -> list[str]:
    """Request i's adapter: `adapter_name(i % num_adapters)` (spread over the batch, so neighbouring
    sequences use different adapters); "" (the base model) for every request when num_adapters is 0."""
    if num_adapters < 0:
        raise ValueError(f"the number of adapters must be >= 0, got {num_adapters}")
    if num_adapters == 0:
        return [""] * num_requests
    return [adapter_name(i % num_adapters) for i in range(num_requests)]


@dataclass(frozen=True, slots=True)
class ThroughputRun:
    """One timed pass of the workload with `num_adapters` distinct adapters (0: the base model)."""

    num_adapters: int
    round_index: int
    duration_s: float
    num_output_tokens: int
    num_changed_outputs: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError(f"duration must be positive, got {self.duration_s}")

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.duration_s


def best_runs(runs: Sequence[ThroughputRun]) -> dict[int, ThroughputRun]:
    """The fastest run of each adapter count (on a shared machine other processes only slow a run down)."""
    best: dict[int, ThroughputRun] = {}
    for run in runs:
        current = best.get(run.num_adapters)
        if current is None or run.output_tokens_per_s > current.output_tokens_per_s:
            best[run.num_adapters] = run
    return dict(sorted(best.items()))


def ratios_to_base(runs: Sequence[ThroughputRun]) -> dict[int, float]:
    """Best tokens/s of each adapter count over the best of the base model (same run)."""
    best = best_runs(runs)
    if 0 not in best:
        raise ValueError("ratios need a base-model run (0 adapters)")
    base = best[0].output_tokens_per_s
    return {n: run.output_tokens_per_s / base for n, run in best.items()}


def round_ratios(runs: Sequence[ThroughputRun]) -> dict[int, list[float]]:
    """Per adapter count, its tokens/s over the base model's in the same round, round by round."""
    base = {r.round_index: r.output_tokens_per_s for r in runs if r.num_adapters == 0}
    out: dict[int, list[float]] = {}
    for run in sorted(runs, key=lambda r: (r.num_adapters, r.round_index)):
        if run.round_index in base:
            out.setdefault(run.num_adapters, []).append(run.output_tokens_per_s / base[run.round_index])
    return out


@dataclass(frozen=True, slots=True)
class LoadTimes:
    """Milliseconds per adapter load, over several adapters."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    def summary(self) -> dict[str, float]:
        return {
            "median_ms": round(self.median_ms, 2),
            "max_ms": round(self.max_ms, 2),
            "count": len(self.samples_ms),
        }


def targets(runs: Sequence[ThroughputRun], cold_load: LoadTimes) -> list[dict[str, Any]]:
    """The issue's targets with what was measured and whether each is met."""
    ratio = ratios_to_base(runs).get(THROUGHPUT_TARGET_ADAPTERS)
    return [
        {
            "target": f"{THROUGHPUT_TARGET_ADAPTERS} adapters / base model, output tok/s",
            "wanted": f">= {THROUGHPUT_TARGET_RATIO}x",
            "measured": "not run" if ratio is None else f"{ratio:.2f}x",
            "met": ratio is not None and ratio >= THROUGHPUT_TARGET_RATIO,
        },
        {
            "target": "cold load of a rank-16 adapter (executor: read + check + copy into a slot)",
            "wanted": f"< {COLD_LOAD_TARGET_MS:.0f} ms",
            "measured": f"{cold_load.median_ms:.1f} ms median, {cold_load.max_ms:.1f} ms max",
            "met": cold_load.max_ms < COLD_LOAD_TARGET_MS,
        },
    ]


def _row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(results: dict[str, Any]) -> str:
    """The results (as `build_results` makes them) as markdown tables."""
    lines = [
        _row([
            "adapters", "output tok/s (best)", "vs base", "per round vs base", "outputs the adapters changed"
        ]),
        _row(["---"] * 5),
    ]
    for row in results["throughput"]:
        label = "base model" if row["num_adapters"] == 0 else str(row["num_adapters"])
        per_round = ", ".join(f"{r:.2f}x" for r in row["round_ratios"])
        changed = "n/a" if row["num_adapters"] == 0 else f"{row['num_changed_outputs']}/{row['num_requests']}"
        lines.append(_row([
            label, f"{row['output_tokens_per_s']:.1f}", f"{row['ratio_to_base']:.2f}x", per_round, changed
        ]))
    loads = results["load_ms"]
    lines += [
        "",
        _row(["adapter load (rank 16, all seven modules)", "median ms", "max ms"]),
        _row(["---"] * 3),
    ]
    for key, label in (
        ("executor_cold", "executor, not in host cache: read + check files, copy into a slot"),
        ("executor_host_cache", "executor, from the host cache: copy into a slot"),
        ("load_adapter_rpc", "LoadAdapter RPC (scheduler reads and checks the files)"),
        ("first_request_extra", "first request's TTFT minus a resident adapter's (load in the plan)"),
    ):
        if key in loads:
            lines.append(_row([label, f"{loads[key]['median_ms']:.1f}", f"{loads[key]['max_ms']:.1f}"]))
    if results["sgmv_microbench"]:
        lines += [
            "",
            _row([
                "SGMV, one layer's 7 modules (shrink + expand), 1 thread", "segments", "torch ref ms",
                "cpu kernel ms", "speed-up", "kernel / the layer's base linears",
            ]),
            _row(["---"] * 6),
        ]
        for r in results["sgmv_microbench"]:
            lines.append(_row([
                r["case"], r["num_segments"], f"{r['torch_ms']:.2f}", f"{r['cpu_ms']:.2f}",
                f"{r['speedup']:.1f}x", f"{100 * r['cpu_of_base_linear']:.0f}%",
            ]))
    lines += ["", _row(["target", "wanted", "measured", "met"]), _row(["---"] * 4)]
    for t in results["targets"]:
        lines.append(_row([t["target"], t["wanted"], t["measured"], "yes" if t["met"] else "**no**"]))
    return "\n".join(lines)


def build_results(
    config: dict[str, Any], machine: dict[str, Any], runs: Sequence[ThroughputRun], num_requests: int,
    load_ms: dict[str, LoadTimes], sgmv: list[dict[str, Any]], command: str,
) -> dict[str, Any]:
    """Everything the JSON file holds."""
    best, ratios, per_round = best_runs(runs), ratios_to_base(runs), round_ratios(runs)
    return {
        "command": command,
        "config": config,
        "machine": machine,
        "throughput": [
            {
                "num_adapters": n,
                "num_requests": num_requests,
                "output_tokens_per_s": round(run.output_tokens_per_s, 2),
                "duration_s": round(run.duration_s, 3),
                "ratio_to_base": round(ratios[n], 4),
                "round_ratios": [round(r, 4) for r in per_round.get(n, [])],
                "num_changed_outputs": run.num_changed_outputs,
            }
            for n, run in best.items()
        ],
        "runs": [
            {"num_adapters": r.num_adapters, "round": r.round_index, "duration_s": round(r.duration_s, 3),
             "output_tokens_per_s": round(r.output_tokens_per_s, 2)}
            for r in runs
        ],
        "load_ms": {key: times.summary() for key, times in load_ms.items()},
        "sgmv_microbench": sgmv,
        "targets": targets(runs, load_ms["executor_cold"]),
    }
