"""Per-step timing of the engine loop: how much of each step is spent outside the executor's forward."""

from __future__ import annotations

import time
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class StepStats:
    """Accumulates step timings and logs a summary every `log_interval_seconds`.

    overhead = wall time of the step - the executor's forward time: scheduling, plan encoding, gRPC,
    input preparation, sampling and result handling — what overlap scheduling would hide.
    """

    log_interval_seconds: float = 10.0
    num_steps: int = 0
    num_tokens: int = 0
    wall_seconds: float = 0.0
    forward_seconds: float = 0.0
    scheduler_seconds: float = 0.0
    total_steps: int = 0
    _last_log: float = 0.0

    def record(
        self, wall_seconds: float, scheduler_seconds: float, forward_seconds: float, num_tokens: int
    ) -> None:
        self.num_steps += 1
        self.total_steps += 1
        self.num_tokens += num_tokens
        self.wall_seconds += wall_seconds
        self.scheduler_seconds += scheduler_seconds
        self.forward_seconds += forward_seconds
        now = time.monotonic()
        if now - self._last_log >= self.log_interval_seconds:
            self._log(now)

    def _log(self, now: float) -> None:
        steps = max(self.num_steps, 1)
        log.info(
            "engine_steps",
            steps=self.num_steps,
            tokens=self.num_tokens,
            ms_per_step=round(1e3 * self.wall_seconds / steps, 3),
            forward_ms_per_step=round(1e3 * self.forward_seconds / steps, 3),
            outside_forward_ms_per_step=round(1e3 * (self.wall_seconds - self.forward_seconds) / steps, 3),
            scheduler_ms_per_step=round(1e3 * self.scheduler_seconds / steps, 3),
        )
        self._last_log = now
        self.num_steps = self.num_tokens = 0
        self.wall_seconds = self.forward_seconds = self.scheduler_seconds = 0.0
