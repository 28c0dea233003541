"""Speculative-decoding benchmark results: draft counters from ServerInfo, rows, targets and the table."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.metrics import BenchmarkMetrics

OFF = "off"
NGRAM = "ngram"
DRAFT_MODEL = "draft_model"
# Speculation off with one plan in flight, as the scheduler runs while it drafts: a diagnostic that
# separates what verification costs or gains from what losing overlap costs.
OFF_NO_OVERLAP = "off-no-overlap"
SPECULATIVE_CONFIGS = (NGRAM, DRAFT_MODEL)
# The targets: ngram at batch 1 on the copy workload, and every configuration at the top batch.
TARGET_TPOT_SPEEDUP = 2.0


@dataclass(frozen=True, slots=True)
class DraftCounters:
    """ServerInfo's speculative-decoding counters; `accepted_per_position[j]` counts draft position j."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()

    @classmethod
    def of(cls, info: Any) -> DraftCounters:
        """From a `pb.ServerInfo` (or anything with its field names)."""
        return cls(
            num_drafts=info.num_drafts,
            num_draft_tokens=info.num_draft_tokens,
            num_accepted_draft_tokens=info.num_accepted_draft_tokens,
            accepted_per_position=tuple(info.num_accepted_per_position),
        )

    def __sub__(self, before: DraftCounters) -> DraftCounters:
        """What one run added: counters after minus before (a position list may grow, never shrink)."""
        width = max(len(self.accepted_per_position), len(before.accepted_per_position))
        after_pos = (*self.accepted_per_position, *[0] * (width - len(self.accepted_per_position)))
        before_pos = (*before.accepted_per_position, *[0] * (width - len(before.accepted_per_position)))
        delta = DraftCounters(
            num_drafts=self.num_drafts - before.num_drafts,
            num_draft_tokens=self.num_draft_tokens - before.num_draft_tokens,
            num_accepted_draft_tokens=self.num_accepted_draft_tokens - before.num_accepted_draft_tokens,
            accepted_per_position=tuple(a - b for a, b in zip(after_pos, before_pos)),
        )
        assert min(delta.num_drafts, delta.num_draft_tokens, delta.num_accepted_draft_tokens,
                   *delta.accepted_per_position, 0) == 0, f"counters went backwards: {before} -> {self}"
        return delta

    @property
    def acceptance_rate(self) -> float | None:
        """Accepted draft tokens / proposed draft tokens; None when nothing was proposed."""
        return self.num_accepted_draft_tokens / self.num_draft_tokens if self.num_draft_tokens else None

    @property
    def acceptance_per_position(self) -> tuple[float, ...]:
        """How often the draft token at position j was accepted, per draft (vLLM's per-position rate)."""
        if not self.num_drafts:
            return ()
        return tuple(count / self.num_drafts for count in self.accepted_per_position)

    @property
    def mean_accepted_per_draft(self) -> float | None:
        return self.num_accepted_draft_tokens / self.num_drafts if self.num_drafts else None


def copied_fraction(output_text: str, passage: str) -> float:
    """The share of the output's words that repeat the passage's words in order (difflib's matching
    blocks over whitespace-split words): 1.0 for a verbatim copy, low for an answer of its own."""
    output_words, passage_words = output_text.split(), passage.split()
    if not output_words:
        return 0.0
    matcher = difflib.SequenceMatcher(None, output_words, passage_words, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / len(output_words)


@dataclass(frozen=True, slots=True)
class SpecRun:
    """One configuration on one workload at one concurrency."""

    config: str
    workload: str
    batch_size: int
    num_requests: int
    output_len: int
    metrics: BenchmarkMetrics
    drafts: DraftCounters
    copied_fraction: float | None = None
    round_index: int = 0

    def summary(self) -> dict[str, Any]:
        tpot = self.metrics.tpot
        return {
            "config": self.config,
            "workload": self.workload,
            "batch_size": self.batch_size,
            "round": self.round_index,
            "num_requests": self.num_requests,
            "output_len": self.output_len,
            "num_failed": self.metrics.num_failed,
            "duration_s": round(self.metrics.duration_s, 3),
            "mean_tpot_ms": _round(tpot.mean_ms),
            "median_tpot_ms": _round(tpot.median_ms),
            "mean_ttft_ms": _round(self.metrics.ttft.mean_ms),
            "output_tokens_per_s": round(self.metrics.output_throughput, 2),
            "num_drafts": self.drafts.num_drafts,
            "num_draft_tokens": self.drafts.num_draft_tokens,
            "num_accepted_draft_tokens": self.drafts.num_accepted_draft_tokens,
            "accepted_per_position": list(self.drafts.accepted_per_position),
            "acceptance_rate": _round(self.drafts.acceptance_rate, 4),
            "acceptance_per_position": [round(r, 4) for r in self.drafts.acceptance_per_position],
            "copied_fraction": _round(self.copied_fraction, 4),
        }


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _key(row: Mapping[str, Any]) -> tuple[str, str, int]:
    return row["config"], row["workload"], row["batch_size"]


def _find(rows: Sequence[dict[str, Any]], key: tuple[str, str, int]) -> dict[str, Any] | None:
    return next((row for row in rows if _key(row) == key), None)


def best_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (config, workload, batch), the round with the highest output throughput, in first-seen order."""
    best: dict[tuple[str, str, int], dict[str, Any]] = {}
    for row in rows:
        if _key(row) not in best or row["output_tokens_per_s"] > best[_key(row)]["output_tokens_per_s"]:
            best[_key(row)] = row
    return list(best.values())


def round_ratios(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, int], list[float]]:
    """Per (config other than off, workload, batch): output tok/s over off's in the same round."""
    ratios: dict[tuple[str, str, int], list[float]] = {}
    for row in rows:
        base = next((b for b in rows if _key(b) == (OFF, row["workload"], row["batch_size"])
                     and b["round"] == row["round"]), None)
        if row["config"] != OFF and base is not None and base["output_tokens_per_s"]:
            ratio = row["output_tokens_per_s"] / base["output_tokens_per_s"]
            ratios.setdefault(_key(row), []).append(round(ratio, 2))
    return ratios


def speedups(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (config other than off, workload, batch): TPOT of off / TPOT of config and the throughput
    ratio config / off (above 1: the config is faster)."""
    result = []
    for row in rows:
        base = _find(rows, (OFF, row["workload"], row["batch_size"]))
        if row["config"] == OFF or base is None:
            continue
        tpot, base_tpot = row["mean_tpot_ms"], base["mean_tpot_ms"]
        result.append({
            "config": row["config"],
            "workload": row["workload"],
            "batch_size": row["batch_size"],
            "tpot_speedup": round(base_tpot / tpot, 3) if tpot and base_tpot else None,
            "throughput_ratio": (
                round(row["output_tokens_per_s"] / base["output_tokens_per_s"], 3)
                if base["output_tokens_per_s"] else None
            ),
        })
    return result


def targets(rows: Sequence[dict[str, Any]], copy_workload: str, top_batch_size: int) -> list[dict[str, Any]]:
    """The issue's two targets, each with what was measured and whether it is met (None: not measured)."""
    ratios = speedups(rows)
    at_one = _find(ratios, (NGRAM, copy_workload, 1))
    speedup = at_one["tpot_speedup"] if at_one else None
    checks = [{
        "target": f"ngram >= {TARGET_TPOT_SPEEDUP:g}x lower TPOT at batch 1 on the {copy_workload} workload",
        "measured": f"{speedup:.2f}x" if speedup is not None else "not measured",
        "met": None if speedup is None else speedup >= TARGET_TPOT_SPEEDUP,
    }]
    loaded = [s for s in ratios if s["batch_size"] == top_batch_size and s["config"] in SPECULATIVE_CONFIGS]
    slower = [s for s in loaded if s["throughput_ratio"] is not None and s["throughput_ratio"] < 1.0
              or s["tpot_speedup"] is not None and s["tpot_speedup"] < 1.0]
    measured = ", ".join(
        f"{s['config']} {s['workload']}: {s['throughput_ratio']}x tok/s, {s['tpot_speedup']}x TPOT"
        for s in loaded
    )
    checks.append({
        "target": f"no configuration slower than speculation off at batch {top_batch_size}",
        "measured": measured or "not measured",
        "met": None if not loaded else not slower,
    })
    return checks


def markdown_table(rows: Sequence[dict[str, Any]], missing: Mapping[str, str] | None = None) -> str:
    """The best round of each configuration (with the throughput ratio to off in every round), then a
    line per configuration that could not run (`missing`: name -> why)."""
    lines = [
        "| workload | batch | config | requests x tokens | mean TPOT ms | output tok/s | TPOT speed-up "
        "| acceptance | accepted per position | copied | tok/s vs off per round |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    best = best_rows(rows)
    ratios = {_key(s): s for s in speedups(best)}
    per_round = round_ratios(rows)
    for row in best:
        ratio = ratios.get(_key(row))
        lines.append(
            f"| {row['workload']} | {row['batch_size']} | {row['config']} "
            f"| {row['num_requests']} x {row['output_len']} | {_fmt(row['mean_tpot_ms'], '.1f')} "
            f"| {row['output_tokens_per_s']:.1f} "
            f"| {_fmt(ratio['tpot_speedup'] if ratio else None, '.2f', 'x')} "
            f"| {_fmt(row['acceptance_rate'], '.0%')} "
            f"| {' / '.join(f'{r:.0%}' for r in row['acceptance_per_position']) or '-'} "
            f"| {_fmt(row['copied_fraction'], '.0%')} "
            f"| {', '.join(f'{r:.2f}x' for r in per_round.get(_key(row), ())) or '-'} |"
        )
    for name, why in (missing or {}).items():
        lines.append(f"| all | all | {name} | {why} | - | - | - | - | - | - | - |")
    return "\n".join(lines)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def targets_markdown(checks: Sequence[dict[str, Any]]) -> str:
    verdict = {True: "met", False: "**not met**", None: "not measured"}
    return "\n".join(f"- {c['target']}: {c['measured']} — {verdict[c['met']]}" for c in checks)
