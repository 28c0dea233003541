"""Random client aborts for the randomized scheduler drivers in tests/unit."""

from __future__ import annotations

import random

from scheduler_service.scheduler import Scheduler


def maybe_abort_one(
    scheduler: Scheduler, rng: random.Random, aborted: set[int], probability: float = 0.03
) -> None:
    """With `probability` (while the scheduler has work), aborts one live sequence chosen at random,
    records it in `aborted` and checks the scheduler's integrity."""
    if not scheduler.has_work or rng.random() >= probability:
        return
    live = [seq.sequence_id for seq in (*scheduler.running, *scheduler.waiting)]
    if live:
        victim = rng.choice(live)
        scheduler.abort_sequence(victim)
        aborted.add(victim)
        scheduler.check_integrity()
