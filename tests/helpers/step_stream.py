"""A synchronous client of the executor's Step stream for tests: send one plan, get its result."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc

from shared.pb.pagewire.v1 import executor_pb2 as pb
from shared.pb.pagewire.v1 import executor_pb2_grpc as pb_grpc
from shared.plan_codec import plan_to_pb, result_from_pb
from shared.step_plan import StepPlan, StepResult


class StepStream:
    """One open Step stream. `step(plan)` blocks until the plan's result arrives."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.ExecutorStub(self.channel)
        self._outbox: queue.Queue[pb.StepPlan | None] = queue.Queue()
        self._results = self.stub.Step(self._requests())

    def _requests(self) -> Iterator[pb.StepPlan]:
        while (message := self._outbox.get()) is not None:
            yield message

    def describe(self) -> pb.ExecutorDescription:
        return self.stub.Describe(pb.DescribeRequest(), timeout=10)

    def step(self, plan: StepPlan) -> StepResult:
        self._outbox.put(plan_to_pb(plan))
        return result_from_pb(next(self._results))

    def close(self) -> None:
        self._outbox.put(None)
        self.channel.close()

    def __enter__(self) -> StepStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
