"""--executor targets: HOST:PORT as given, dns:///NAME:PORT as every address NAME resolves to now."""

from __future__ import annotations

import asyncio

import pytest

from scheduler_service.engine_config import EngineConfig
from scheduler_service.executor_discovery import ExecutorDiscovery, ExecutorTarget, resolve_host


def test_targets_parse_and_bad_ones_say_what_to_write() -> None:
    assert ExecutorTarget.parse("10.0.0.1:50061") == ExecutorTarget("10.0.0.1:50061", "10.0.0.1", 50061, False)
    assert ExecutorTarget.parse("dns:///executor:50061") == ExecutorTarget(
        "dns:///executor:50061", "executor", 50061, True
    )
    for bad in ("executor", "dns:///executor", "h:0", "h:x", ":50061"):
        with pytest.raises(ValueError, match="is not HOST:PORT or dns:///NAME:PORT"):
            ExecutorTarget.parse(bad)
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        EngineConfig(executor_addresses=("h:1", "nope"))
    with pytest.raises(ValueError, match="give at least one --executor"):
        EngineConfig(executor_addresses=())


def test_localhost_resolves_to_loopback() -> None:
    assert "127.0.0.1:50061" in resolve_host("localhost", 50061)


def test_dns_targets_follow_the_answers_and_keep_the_last_one_when_resolution_fails() -> None:
    answers: list[list[str] | OSError] = [["10.0.0.2:1", "10.0.0.3:1"], ["10.0.0.3:1", "10.0.0.4:1"], OSError("down")]
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        answer = answers.pop(0)
        if isinstance(answer, OSError):
            raise answer
        return answer

    discovery = ExecutorDiscovery(("10.0.0.1:1", "dns:///executor:1", "10.0.0.3:1"), resolve)
    assert discovery.static_addresses() == ["10.0.0.1:1", "10.0.0.3:1"]
    assert asyncio.run(discovery.addresses()) == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"]
    assert asyncio.run(discovery.addresses()) == ["10.0.0.1:1", "10.0.0.3:1", "10.0.0.4:1"]
    assert asyncio.run(discovery.addresses()) == ["10.0.0.1:1", "10.0.0.3:1", "10.0.0.4:1"]
    assert asked == [("executor", 1)] * 3


def test_the_engine_adds_a_replica_per_new_address_and_removes_one_that_left_unconnected() -> None:
    from scheduler_service.engine import Engine

    async def follow() -> tuple[list[str], list[str]]:
        # Nothing listens on these ports: the replicas keep trying to connect, never ready.
        engine = Engine(EngineConfig(executor_addresses=("dns:///executors:1",)))
        await engine._follow(["127.0.0.1:1", "127.0.0.1:2"])
        added = list(engine.replicas)
        await engine._follow(["127.0.0.1:2", "127.0.0.1:3"])
        followed = list(engine.replicas)
        await engine.stop()
        return added, followed

    assert asyncio.run(follow()) == (["127.0.0.1:1", "127.0.0.1:2"], ["127.0.0.1:2", "127.0.0.1:3"])
