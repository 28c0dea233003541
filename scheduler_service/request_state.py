"""One client request as the engine sees it: its sequence, its text state and its outbound deltas."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from scheduler_service.detokenizer import IncrementalDetokenizer
from scheduler_service.engine_observer import EngineObserver
from scheduler_service.request_timeline import RequestTimeline
from scheduler_service.stop_checker import StopChecker
from scheduler_service.tokenizer import Tokenizer
from shared.sampling_params import SamplingParams
from shared.step_plan import SequenceId, SequenceOutput

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class RequestDelta:
    """What a client receives in one message: new tokens, their text, and on the last one the end."""

    token_ids: tuple[int, ...] = ()
    text: str = ""
    logprobs: tuple[float, ...] = ()
    # Per token, the top-N (token id, logprob) pairs the request asked for, most likely first.
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] = ()
    finish_reason: str | None = None
    usage: Usage | None = None


def merge_deltas(deltas: list[RequestDelta]) -> RequestDelta:
    """One delta saying what `deltas` say in order: tokens, text and logprobs concatenated, the last
    one's end. Only the last may carry a finish reason."""
    if len(deltas) == 1:
        return deltas[0]
    return RequestDelta(
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        text="".join(d.text for d in deltas),
        logprobs=tuple(x for d in deltas for x in d.logprobs),
        top_logprobs=tuple(x for d in deltas for x in d.top_logprobs),
        finish_reason=deltas[-1].finish_reason,
        usage=deltas[-1].usage,
    )


class RequestState:
    """Turns a sequence's sampled tokens into client deltas, exactly once each.

    Invariant: the concatenation of every delta's token_ids is the request's output so far, so after a
    preemption (recompute or swap) the client's stream continues where it stopped, nothing repeated.
    """

    def __init__(
        self,
        request_id: str,
        sequence_id: SequenceId,
        prompt_token_ids: tuple[int, ...],
        params: SamplingParams,
        tokenizer: Tokenizer,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        observer: EngineObserver | None = None,
    ) -> None:
        self.request_id = request_id
        self.sequence_id = sequence_id
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self.stop_checker = StopChecker(params, eos_token_ids, max_model_len, len(prompt_token_ids))
        self.deltas: asyncio.Queue[RequestDelta | BaseException] = asyncio.Queue()
        # An error found queued behind deltas that `next_delta` merged: raised by its next call.
        self._queued_error: BaseException | None = None
        self.num_cached_prompt_tokens = 0
        self.is_finished = False
        self.observer = observer or EngineObserver()
        self.timeline = RequestTimeline(arrival_seconds=time.monotonic())

    def usage(self) -> Usage:
        return Usage(self.num_prompt_tokens, self.stop_checker.num_output_tokens, self.num_cached_prompt_tokens)

    def on_output(self, output: SequenceOutput) -> bool:
        """Queues the delta for `output`; returns True when the request finished with it."""
        verdict = self.stop_checker.scan_tokens(output.token_ids)
        text = self.detokenizer.push(output.token_ids[: verdict.num_tokens_to_detokenize])
        if verdict.finish_reason is not None:
            text += self.detokenizer.flush()
        decision = self.stop_checker.check(output.token_ids, text)
        num_tokens = decision.num_tokens_to_emit
        finished = decision.finish_reason is not None
        delta = RequestDelta(
            token_ids=tuple(output.token_ids[:num_tokens]),
            text=decision.text_to_emit,
            logprobs=tuple(output.logprobs[:num_tokens]),
            top_logprobs=tuple(output.top_logprobs[:num_tokens]),
            finish_reason=decision.finish_reason.value if finished else None,
            usage=self.usage() if finished else None,
        )
        self.is_finished = finished
        self._send(delta)
        return finished

    async def next_delta(self) -> RequestDelta:
        """Waits for the next delta and merges into it every delta already queued behind it, so a client
        that reads slower than the engine steps gets fewer, larger messages (the same tokens and text, in
        order); raises the request's error once the deltas before it were returned."""
        if self._queued_error is not None:
            raise self._queued_error
        first = await self.deltas.get()
        if isinstance(first, BaseException):
            raise first
        merged = [first]
        while merged[-1].finish_reason is None and not self.deltas.empty():
            item = self.deltas.get_nowait()
            if isinstance(item, BaseException):
                self._queued_error = item
                break
            merged.append(item)
        return merge_deltas(merged)

    def abort(self) -> None:
        """Ends the stream with ABORT (server-side abort, e.g. shutdown)."""
        if not self.is_finished:
            self.is_finished = True
            self._send(RequestDelta(finish_reason=FINISH_ABORT, usage=self.usage()))

    def _send(self, delta: RequestDelta) -> None:
        self.observer.on_delta(self, delta, time.monotonic())
        self.deltas.put_nowait(delta)

    def fail(self, error: BaseException) -> None:
        """Ends the stream with an error status for the client."""
        if not self.is_finished:
            self.is_finished = True
            self.deltas.put_nowait(error)
