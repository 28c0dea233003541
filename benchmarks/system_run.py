"""One timed run of one system on one workload: the unit every comparison figure is computed from."""

from __future__ import annotations

from dataclasses import dataclass

PAGEWIRE = "pagewire"
HF_GENERATE = "hf-generate"
HF_GENERATE_BATCH = "hf-generate-batch"
VLLM_CPU = "vllm-cpu"


@dataclass(frozen=True, slots=True)
class SystemRun:
    """`num_output_tokens` counts requested tokens only (a static batch's extra tokens are not counted);
    `outputs` holds each request's generated token ids, in workload order, for the equality check."""

    system: str
    workload: str
    num_threads: int
    duration_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    outputs: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError(
                f"{self.system} on {self.workload}: duration must be positive, got {self.duration_s}"
            )

    @property
    def output_tokens_per_s(self) -> float:
        return self.num_output_tokens / self.duration_s

    @property
    def total_tokens_per_s(self) -> float:
        return (self.num_prompt_tokens + self.num_output_tokens) / self.duration_s

    def summary(self) -> dict[str, object]:
        return {
            "system": self.system,
            "workload": self.workload,
            "num_threads": self.num_threads,
            "duration_s": round(self.duration_s, 4),
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_output_tokens": self.num_output_tokens,
            "output_tokens_per_s": round(self.output_tokens_per_s, 2),
            "total_tokens_per_s": round(self.total_tokens_per_s, 2),
        }
