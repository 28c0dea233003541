"""When one request arrived, was first scheduled, and produced its first and latest tokens."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class RequestTimeline:
    """Monotonic timestamps (`time.monotonic()` seconds) of one request; None until it happens.

    `scheduled_seconds` is the first time a plan included the request (a later resume after a
    preemption does not move it), so `scheduled - arrival` is the time it spent queued.
    """

    arrival_seconds: float
    scheduled_seconds: float | None = None
    first_token_seconds: float | None = None
    last_token_seconds: float | None = None

    def mark_scheduled(self, now: float) -> None:
        if self.scheduled_seconds is None:
            self.scheduled_seconds = now

    def mark_tokens(self, now: float) -> float | None:
        """Records a delta with tokens at `now`; returns the gap since the previous one (None for the first)."""
        previous = self.last_token_seconds
        if self.first_token_seconds is None:
            self.first_token_seconds = now
        self.last_token_seconds = now
        return None if previous is None else now - previous

    @property
    def queue_seconds(self) -> float | None:
        return None if self.scheduled_seconds is None else self.scheduled_seconds - self.arrival_seconds

    @property
    def time_to_first_token_seconds(self) -> float | None:
        return None if self.first_token_seconds is None else self.first_token_seconds - self.arrival_seconds
