"""Which scheduler owns this executor: one at a time, so two schedulers never drive one persistent batch.

The owner holds the lease while its Step stream is open and for `lease_seconds` after the stream ends,
so a scheduler that restarts (or reconnects after a network blip) with the same id gets its executor back
first. An owner that dies stops answering HTTP/2 keepalive pings; its stream ends, and once the grace
period has passed any scheduler may take the executor. A client that sends no scheduler id (a tool,
a test driving the stream by hand) is the anonymous owner "": it may take a free executor and keeps no
lease once its stream ends.
"""

from __future__ import annotations

from shared.errors import Aborted, FailedPrecondition

ANONYMOUS_ID = ""
# A scheduler refused this long ago or less still counts as waiting for this executor: schedulers retry
# a refused executor every fraction of a second, so one that stopped asking has gone elsewhere or died.
WAITING_SECONDS = 5.0


class ExecutorLease:
    """The current owner, its stream's epoch and when that stream ended. Times are `time.monotonic()`
    seconds passed in by the caller, so the rules are plain, deterministic code.

    Invariant: `epoch` counts accepted streams; only the stream of the current epoch may run plans.
    """

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self.owner_id: str | None = None
        self.epoch = 0
        self.is_stream_open = False
        self.released_at = 0.0
        self._refused_at: dict[str, float] = {}

    def holder(self, now: float) -> str | None:
        """The scheduler id that holds the lease at `now`; None when any scheduler may take it."""
        if self.owner_id is None or self.is_stream_open:
            return self.owner_id
        if self.owner_id == ANONYMOUS_ID or now - self.released_at >= self.lease_seconds:
            return None
        return self.owner_id

    def check(self, scheduler_id: str, now: float) -> None:
        """Raises FailedPrecondition naming the owner when `scheduler_id` may not drive this executor now."""
        holder = self.holder(now)
        if holder is None or holder == scheduler_id:
            return
        if scheduler_id != ANONYMOUS_ID:
            self._refused_at[scheduler_id] = now
        owner = "an anonymous client" if holder == ANONYMOUS_ID else f"scheduler {holder!r}"
        if self.is_stream_open:
            held = "its Step stream is open"
        else:
            held = f"its lease lasts {self.lease_seconds - (now - self.released_at):.1f} s more"
        raise FailedPrecondition(
            f"this executor is owned by {owner} ({held}); point this scheduler at another executor, or "
            f"start it with --scheduler-id {holder} if it replaces that scheduler"
        )

    def open_stream(self, scheduler_id: str, now: float) -> int:
        """Takes the lease for a new stream of `scheduler_id` and returns its epoch. The owner's own older
        stream, if still open, is superseded (its next plan is refused)."""
        self.check(scheduler_id, now)
        self.owner_id = scheduler_id
        self.epoch += 1
        self.is_stream_open = True
        return self.epoch

    def is_current(self, epoch: int) -> bool:
        return epoch == self.epoch

    def close_stream(self, epoch: int, now: float) -> bool:
        """Records the end of stream `epoch`; True when it was the current one (the grace period starts
        and its persistent batch is to be dropped), False for a superseded stream.

        A clean goodbye and a crash look the same here: grpc ends the request stream normally when the
        scheduler's connection drops, so the grace period always applies."""
        if not self.is_current(epoch):
            return False
        self.is_stream_open = False
        self.released_at = now
        return True

    def waiting(self, now: float) -> tuple[str, ...]:
        """Scheduler ids refused within `WAITING_SECONDS` before `now`, the holder excluded, sorted."""
        holder = self.holder(now)
        self._refused_at = {i: at for i, at in self._refused_at.items() if now - at <= WAITING_SECONDS}
        return tuple(sorted(i for i in self._refused_at if i != holder))

    def release(self, scheduler_id: str) -> None:
        """The owner gives the lease up now, once its stream has ended: any scheduler may take it next.
        Raises FailedPrecondition for anyone else, or while the owner's stream is open."""
        if self.owner_id != scheduler_id or scheduler_id == ANONYMOUS_ID:
            raise FailedPrecondition(
                f"only the owner may release this executor's lease; it is {self.owner_id!r}, not {scheduler_id!r}"
            )
        if self.is_stream_open:
            raise Aborted("the lease is released after the Step stream ends; close it first, then retry")
        self.owner_id = None
