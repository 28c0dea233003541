"""The executor's one-owner lease: who may open a Step stream when (times given explicitly)."""

from __future__ import annotations

import pytest

from executor_service.executor_lease import ANONYMOUS_ID, WAITING_SECONDS, ExecutorLease
from shared.errors import Aborted, FailedPrecondition

LEASE_SECONDS = 10.0


def test_a_free_executor_goes_to_the_first_scheduler_and_refuses_the_second_naming_the_owner():
    lease = ExecutorLease(LEASE_SECONDS)
    assert lease.holder(0.0) is None
    assert lease.open_stream("a", 0.0) == 1
    assert lease.holder(100.0) == "a"
    with pytest.raises(FailedPrecondition, match=r"owned by scheduler 'a' \(its Step stream is open\).*"
                       r"--scheduler-id a"):
        lease.open_stream("b", 100.0)
    assert (lease.owner_id, lease.epoch, lease.is_stream_open) == ("a", 1, True)


def test_the_owner_keeps_the_lease_for_its_grace_period_after_its_stream_ends_then_anyone_may_take_it():
    lease = ExecutorLease(LEASE_SECONDS)
    epoch = lease.open_stream("a", 0.0)
    assert lease.close_stream(epoch, 5.0) is True
    assert lease.holder(14.9) == "a"
    with pytest.raises(FailedPrecondition, match=r"its lease lasts 0\.1 s more"):
        lease.check("b", 14.9)
    assert lease.holder(15.0) is None
    assert lease.open_stream("b", 15.0) == 2
    assert lease.owner_id == "b"


def test_the_same_scheduler_reclaims_at_once_and_its_older_stream_is_superseded():
    lease = ExecutorLease(LEASE_SECONDS)
    first = lease.open_stream("a", 0.0)
    second = lease.open_stream("a", 1.0)  # the old stream is still open (a reconnect the executor missed)
    assert (first, second) == (1, 2)
    assert not lease.is_current(first) and lease.is_current(second)
    assert lease.close_stream(first, 2.0) is False  # the superseded stream ending changes nothing
    assert lease.is_stream_open
    assert lease.close_stream(second, 3.0) is True
    assert lease.open_stream("a", 3.5) == 3  # a restart with the same id, inside the grace period


def test_an_anonymous_client_keeps_no_lease_after_its_stream_but_is_refused_while_another_owns_it():
    lease = ExecutorLease(LEASE_SECONDS)
    epoch = lease.open_stream(ANONYMOUS_ID, 0.0)
    with pytest.raises(FailedPrecondition, match="owned by an anonymous client"):
        lease.check("a", 0.5)
    lease.close_stream(epoch, 1.0)
    assert lease.holder(1.0) is None
    lease.open_stream("a", 1.0)
    with pytest.raises(FailedPrecondition, match="owned by scheduler 'a'"):
        lease.check(ANONYMOUS_ID, 2.0)


def test_a_zero_lease_frees_the_executor_the_moment_the_stream_ends():
    lease = ExecutorLease(0.0)
    lease.close_stream(lease.open_stream("a", 0.0), 1.0)
    assert lease.holder(1.0) is None



def test_refused_schedulers_are_listed_as_waiting_until_they_stop_asking():
    lease = ExecutorLease(LEASE_SECONDS)
    lease.open_stream("a", 0.0)
    for scheduler_id, at in (("c", 1.0), ("b", 2.0), (ANONYMOUS_ID, 2.0)):
        with pytest.raises(FailedPrecondition):
            lease.check(scheduler_id, at)
    assert lease.waiting(2.0) == ("b", "c")
    assert lease.waiting(1.0 + WAITING_SECONDS) == ("b", "c")
    assert lease.waiting(1.0 + WAITING_SECONDS + 0.01) == ("b",)
    assert lease.waiting(2.0 + WAITING_SECONDS + 0.01) == ()


def test_the_owner_releases_after_its_stream_ends_and_anyone_may_take_it_at_once():
    lease = ExecutorLease(LEASE_SECONDS)
    epoch = lease.open_stream("a", 0.0)
    with pytest.raises(Aborted, match="after the Step stream ends"):
        lease.release("a")
    with pytest.raises(FailedPrecondition, match="only the owner"):
        lease.release("b")
    lease.close_stream(epoch, 1.0)
    assert lease.holder(1.0) == "a"
    lease.release("a")
    assert lease.holder(1.0) is None
    assert lease.open_stream("b", 1.0) == 2
    with pytest.raises(FailedPrecondition, match="only the owner"):
        lease.release(ANONYMOUS_ID)
