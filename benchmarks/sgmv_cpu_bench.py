"""Micro-benchmark of CPU SGMV: one bench-model layer's seven LoRA deltas, torch reference vs CpuOps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from executor_service.model.config import ModelConfig
from executor_service.ops.base import OpsBackend
from executor_service.ops.sgmv_segments import SgmvSegments
from shared.lora.target_modules import module_shapes


@dataclass(frozen=True, slots=True)
class SgmvCase:
    """`num_rows` batch rows; row runs `(num_rows, slot)` in batch order, as the runner lays them out."""

    name: str
    runs: tuple[tuple[int, int], ...]

    @property
    def num_rows(self) -> int:
        return sum(n for n, _ in self.runs)

    def segments(self) -> SgmvSegments:
        starts, slots = [0], []
        for num_rows, slot in self.runs:
            if slots and slots[-1] == slot:
                starts[-1] += num_rows
            else:
                slots.append(slot)
                starts.append(starts[-1] + num_rows)
        return SgmvSegments.build(starts, slots)


def decode_case(num_rows: int, num_adapters: int) -> SgmvCase:
    """One row per sequence, sequence i on adapter i % num_adapters (the bench's spread)."""
    runs = tuple((1, i % num_adapters) for i in range(num_rows))
    return SgmvCase(f"decode {num_rows} rows, {num_adapters} adapters", runs)


DEFAULT_CASES = (
    decode_case(64, 1),
    decode_case(64, 8),
    decode_case(64, 32),
    SgmvCase("prefill 4 x 128 rows, 4 adapters", tuple((128, slot) for slot in range(4))),
    SgmvCase(
        "chunk 256 rows + 63 decodes, 32 adapters", ((256, 0), *((1, 1 + i % 31) for i in range(63)))
    ),
)


@dataclass(frozen=True, slots=True)
class SgmvTiming:
    """Milliseconds for one decoder layer: the seven shrink+expand pairs by each backend, and the
    layer's seven dense base projections for the same rows (what the LoRA work adds to)."""

    case: str
    num_rows: int
    num_segments: int
    torch_ms: float
    cpu_ms: float
    base_linear_ms: float

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.cpu_ms

    def summary(self) -> dict[str, object]:
        return {
            "case": self.case,
            "num_rows": self.num_rows,
            "num_segments": self.num_segments,
            "torch_ms": round(self.torch_ms, 3),
            "cpu_ms": round(self.cpu_ms, 3),
            "speedup": round(self.speedup, 2),
            "base_linear_ms": round(self.base_linear_ms, 3),
            "cpu_of_base_linear": round(self.cpu_ms / self.base_linear_ms, 4),
        }


def _best_ms(fn: Callable[[], None], min_time_s: float, rounds: int) -> float:
    """Best over `rounds` of the mean time per call over about `min_time_s` (other processes on a
    shared machine only ever make a round slower)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        calls, started = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= min_time_s:
                break
        best = min(best, elapsed / calls)
    return best * 1e3


def time_sgmv_cases(
    reference: OpsBackend, candidate: OpsBackend, model: ModelConfig, cases: tuple[SgmvCase, ...],
    num_slots: int = 32, rank: int = 16, min_time_s: float = 0.2, rounds: int = 3,
) -> list[SgmvTiming]:
    """Times every case on both backends over `num_slots` slots of rank `rank` (float32)."""
    generator = torch.Generator().manual_seed(0)
    shapes = module_shapes(model)
    weights = {
        m: (torch.randn(num_slots, rank, i, generator=generator) * 0.02,
            torch.randn(num_slots, o, rank, generator=generator) * 0.02,
            torch.randn(o, i, generator=generator) * 0.02)
        for m, (i, o) in shapes.items()
    }
    timings = []
    for case in cases:
        n, segments = case.num_rows, case.segments()
        inputs = {i: torch.randn(n, i, generator=generator) for i, _ in shapes.values()}
        outs = {o: torch.zeros(n, o) for _, o in shapes.values()}
        shrunk = torch.empty(n, rank)

        def layer(ops: OpsBackend) -> None:
            for module, (i, o) in shapes.items():
                lora_a, lora_b, _ = weights[module]
                ops.sgmv_shrink(inputs[i], lora_a, shrunk, segments, 1.0)
                ops.sgmv_expand(shrunk, lora_b, outs[o], segments)

        def base() -> None:
            for module, (i, _) in shapes.items():
                F.linear(inputs[i], weights[module][2])

        timings.append(SgmvTiming(
            case=case.name,
            num_rows=n,
            num_segments=segments.num_segments,
            torch_ms=_best_ms(lambda: layer(reference), min_time_s, rounds),
            cpu_ms=_best_ms(lambda: layer(candidate), min_time_s, rounds),
            base_linear_ms=_best_ms(base, min_time_s, rounds),
        ))
    return timings
