"""What the engine reports as it runs (each client delta, each step), for metrics; the base ignores it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler_service.request_state import RequestDelta, RequestState


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step, in seconds: its wall time (see `Engine._step`), the part the executor spent
    on it (`StepResult.timing.total_seconds`), its forward, and how many tokens it computed."""

    wall_seconds: float
    executor_seconds: float
    forward_seconds: float
    num_tokens: int


class EngineObserver:
    """Called on the engine's event loop, synchronously: an implementation must not block or raise.

    `on_delta` sees every delta a request sends its client, in order, whatever the API (gRPC or
    HTTP); the last one carries the finish reason (stop, length or abort). A request that fails with
    an error sends no last delta.
    """

    def on_delta(self, request: RequestState, delta: RequestDelta, now: float) -> None:
        pass

    def on_step(self, step: StepRecord) -> None:
        pass
