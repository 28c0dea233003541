"""How schedulers pointed at one executor set divide it: each holds at most its fair share.

Every scheduler retries, every fraction of a second, each executor it does not own, so each executor
knows which other schedulers want it (GetLease's waiting ids), and an owner learns from its own
executors how many schedulers are live. With E executors and S schedulers, a scheduler holding more than
ceil(E / S) gives one up at a time (drain, then ReleaseLease); a waiting scheduler takes it. A scheduler
never gives up its last executor, and S counts only schedulers seen asking lately, so the share of one
that died returns to the others once its lease runs out.
"""

from __future__ import annotations

import math


def fair_share(num_executors: int, num_other_schedulers: int) -> int:
    """The most executors one of `1 + num_other_schedulers` schedulers should hold (at least 1)."""
    return max(1, math.ceil(num_executors / (1 + num_other_schedulers)))


def num_to_give_up(num_owned: int, num_executors: int, num_other_schedulers: int) -> int:
    """How many of its `num_owned` executors a scheduler should release; 0 when no other scheduler waits."""
    if num_other_schedulers == 0:
        return 0
    return max(0, num_owned - fair_share(num_executors, num_other_schedulers))
