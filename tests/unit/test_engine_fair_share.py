"""The engine's side of dividing an executor set between schedulers: on each lease poll it gives one
executor up while it holds more than its share, until it holds its share, and takes no free executor
beyond it. Replicas here are stand-ins with a replica's lease state; the rules are the engine's own."""

from __future__ import annotations

import pytest

from scheduler_service.engine import Engine
from scheduler_service.engine_config import EngineConfig
from scheduler_service.fair_share import fair_share


class Replica:
    """What the share rules read of an ExecutorReplica: ready, giving up, the waiting schedulers, load."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.is_ready = True
        self.is_yielding = False
        self.waiting_schedulers: tuple[str, ...] = ()

    @property
    def accepts_work(self) -> bool:
        return self.is_ready and not self.is_yielding

    def num_load_tokens(self) -> int:
        return 0

    def give_up(self) -> None:
        self.is_yielding = True


def engine_with(num_executors: int) -> tuple[Engine, list[Replica]]:
    engine = Engine(EngineConfig(executor_addresses=("127.0.0.1:1",)))
    replicas = [Replica(f"127.0.0.1:{port}") for port in range(2, 2 + num_executors)]
    engine.replicas = {r.address: r for r in replicas}  # type: ignore[assignment]
    return engine, replicas


@pytest.mark.parametrize(
    ("num_executors", "others"),
    [(3, ("b",)), (4, ("b",)), (5, ("b",)), (3, ("b", "c")), (16, ("b", "c", "d"))],
)
def test_lease_polls_give_executors_up_one_at_a_time_down_to_the_share(
    num_executors: int, others: tuple[str, ...]
) -> None:
    engine, replicas = engine_with(num_executors)
    given_up_per_round = []
    for _ in range(3 * num_executors):
        for replica in replicas:  # a lease poll: the other schedulers keep asking
            if replica.is_ready:
                replica.waiting_schedulers = others
                engine.on_waiting_schedulers(replica)  # type: ignore[arg-type]
        yielding = [r for r in replicas if r.is_yielding]
        given_up_per_round.append(len(yielding))
        for replica in yielding:  # released; a waiting scheduler takes it
            replica.is_yielding, replica.is_ready, replica.waiting_schedulers = False, False, ()
    assert max(given_up_per_round) == 1
    assert sum(r.is_ready for r in replicas) == fair_share(num_executors, len(others))


def test_no_free_executor_is_taken_beyond_the_share_while_others_wait() -> None:
    engine, replicas = engine_with(3)
    free = replicas[2]
    free.is_ready = False
    replicas[0].waiting_schedulers = ("b", "c")  # three schedulers: a share of one
    assert not engine.may_take(free)  # type: ignore[arg-type]
    replicas[0].waiting_schedulers = ("b",)  # two: a share of two, and this one holds two
    assert not engine.may_take(free)  # type: ignore[arg-type]
    replicas[0].waiting_schedulers = replicas[1].waiting_schedulers = ()  # nobody waits
    assert engine.may_take(free)  # type: ignore[arg-type]
