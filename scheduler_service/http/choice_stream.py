"""The requests behind one OpenAI call (one per choice), read as they stream or collected whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from scheduler_service.engine import Engine
from scheduler_service.request_state import RequestDelta, RequestState, Usage


@dataclass(slots=True)
class ChoiceOutput:
    """Everything one choice produced: the concatenation of its deltas."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None

    def add(self, delta: RequestDelta) -> None:
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.top_logprobs.extend(delta.top_logprobs)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.usage = delta.usage


class ChoiceStream:
    """The requests of one call, choice i being `states[i]`; `close()` aborts those still running."""

    def __init__(self, engine: Engine, states: list[RequestState]) -> None:
        self.engine = engine
        self.states = states

    def close(self) -> None:
        for state in self.states:
            self.engine.abort(state)

    async def deltas(self) -> AsyncIterator[tuple[int, RequestDelta]]:
        """(choice index, delta) in arrival order until every choice finished; a failed request raises."""
        pending: dict[asyncio.Future[RequestDelta | BaseException], int] = {
            asyncio.ensure_future(state.deltas.get()): index for index, state in enumerate(self.states)
        }
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: pending[f]):
                    index = pending.pop(future)
                    delta = future.result()
                    if isinstance(delta, BaseException):
                        raise delta
                    yield index, delta
                    if delta.finish_reason is None:
                        pending[asyncio.ensure_future(self.states[index].deltas.get())] = index
        finally:
            for future in pending:
                future.cancel()

    async def collect(self) -> list[ChoiceOutput]:
        outputs = [ChoiceOutput() for _ in self.states]
        async for index, delta in self.deltas():
            outputs[index].add(delta)
        return outputs
