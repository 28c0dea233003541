"""A snapshot of one executor replica for ServerInfo and the metrics, and the sum over replicas."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler_service.scheduler_counters import SchedulerCounters


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """Gauges are now; `counters`, `num_requests_placed` and `num_plan_bytes_sent` are cumulative
    since the scheduler started (placements include re-placements after an executor was lost).
    An executor that never described itself reports zeros and an empty device."""

    address: str
    is_ready: bool
    is_draining: bool
    device: str = ""
    block_size: int = 0
    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    num_device_blocks: int = 0
    num_free_device_blocks: int = 0
    num_used_device_blocks: int = 0
    num_cached_device_blocks: int = 0
    num_free_cached_device_blocks: int = 0
    num_host_blocks: int = 0
    num_free_host_blocks: int = 0
    num_requests_placed: int = 0
    num_plan_bytes_sent: int = 0
    counters: SchedulerCounters = dataclasses.field(default_factory=SchedulerCounters)


_SUMMED = tuple(
    f.name for f in dataclasses.fields(ReplicaStatus) if f.type == "int" and f.name != "block_size"
)


def _add(a: int | list[int], b: int | list[int]) -> int | list[int]:
    """Counts add; per-position counts (lists) add position by position."""
    if isinstance(a, list) and isinstance(b, list):
        return [x + y for x, y in itertools.zip_longest(a, b, fillvalue=0)]
    return a + b


def sum_statuses(statuses: Sequence[ReplicaStatus]) -> ReplicaStatus:
    """Counts and counters added up; ready/draining when any is; device and block size of the first
    executor that has one."""
    counters = SchedulerCounters()
    for status in statuses:
        for field in dataclasses.fields(SchedulerCounters):
            ours, theirs = getattr(counters, field.name), getattr(status.counters, field.name)
            setattr(counters, field.name, _add(ours, theirs))
    described = [status for status in statuses if status.device]
    return ReplicaStatus(
        address=",".join(status.address for status in statuses),
        is_ready=any(status.is_ready for status in statuses),
        is_draining=any(status.is_draining for status in statuses),
        device=described[0].device if described else "",
        block_size=described[0].block_size if described else 0,
        counters=counters,
        **{name: sum(getattr(status, name) for status in statuses) for name in _SUMMED},
    )
