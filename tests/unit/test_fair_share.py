"""How schedulers sharing an executor set divide it (scheduler_service/fair_share.py)."""

from __future__ import annotations

import pytest

from scheduler_service.fair_share import fair_share, num_to_give_up


@pytest.mark.parametrize(
    ("num_executors", "num_others", "share"),
    [(3, 0, 3), (3, 1, 2), (3, 2, 1), (4, 1, 2), (1, 1, 1), (1, 5, 1), (16, 3, 4), (17, 3, 5), (0, 0, 1)],
)
def test_the_share_is_the_executors_over_the_schedulers_rounded_up_and_never_zero(
    num_executors: int, num_others: int, share: int
) -> None:
    assert fair_share(num_executors, num_others) == share


def test_a_scheduler_alone_keeps_everything() -> None:
    assert num_to_give_up(num_owned=3, num_executors=3, num_other_schedulers=0) == 0


def test_holding_more_than_the_share_while_others_wait_gives_the_excess_up() -> None:
    assert num_to_give_up(num_owned=3, num_executors=3, num_other_schedulers=1) == 1
    assert num_to_give_up(num_owned=3, num_executors=3, num_other_schedulers=2) == 2
    assert num_to_give_up(num_owned=2, num_executors=3, num_other_schedulers=1) == 0


def test_the_division_settles_two_schedulers_on_three_executors_at_two_and_one() -> None:
    """Simulates the protocol: the one over its share gives one executor up, the waiting one takes it."""
    owned = {"a": 3, "b": 0}
    for _ in range(5):
        for me, other in (("a", "b"), ("b", "a")):
            excess = num_to_give_up(owned[me], 3, num_other_schedulers=1)
            owned[me] -= excess
            owned[other] += excess
    assert sorted(owned.values()) == [1, 2]
