"""Runs plans like `ModelRunner` with no model: the same validation and persistent batch, a modelled step
time slept on the step thread, and a token that is a hash of the sequence's tokens so far."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from executor_service.persistent_batch import BatchLimits, PersistentBatch, ScheduledSequence
from executor_service.simulation.step_time_profile import StepTimeModel
from shared.errors import PagewireError
from shared.step_plan import SequenceOutput, StepError, StepPlan, StepResult, StepTiming

log = structlog.get_logger(__name__)

_MASK_64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
# The logprob reported for the top-N runners-up: the simulated distribution puts all mass on its token.
RUNNER_UP_LOGPROB = -100.0


def extend_hash(state: int, token_ids: list[int] | tuple[int, ...]) -> int:
    """FNV-1a over token ids (64 bits): `extend_hash(extend_hash(h, a), b) == extend_hash(h, a + b)`."""
    for token_id in token_ids:
        state = ((state ^ (token_id & _MASK_64)) * _FNV_PRIME) & _MASK_64
    return state


def token_from_hash(state: int, vocab_size: int) -> int:
    mixed = state ^ (state >> 29)
    mixed = (mixed * 0xBF58476D1CE4E5B9) & _MASK_64
    return (mixed ^ (mixed >> 32)) % vocab_size


def simulated_next_token(token_ids: list[int] | tuple[int, ...], vocab_size: int) -> int:
    """The token a simulated executor samples after `token_ids` (prompt + output so far): a function of
    those ids alone, so a sequence resumed by recompute continues exactly where it left off."""
    return token_from_hash(extend_hash(_FNV_OFFSET, token_ids), vocab_size)


class SimulatedRunner:
    """The `StepRunner` of a simulated executor. `execute` answers every plan, as `ModelRunner` does:
    a rejected plan changes nothing; a valid one takes `step_time.forward_seconds(...)` plus the swap time
    at the profile's speeds (slept, on the caller's thread), and `forward_seconds` reports the model's
    figure exactly. Sampling parameters other than min_tokens are ignored: the token is always the hash's.
    """

    def __init__(
        self,
        step_time: StepTimeModel,
        limits: BatchLimits,
        bytes_per_block: int,
        swap_out_bytes_per_second: float,
        swap_in_bytes_per_second: float,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.step_time = step_time
        self.batch = PersistentBatch(limits)
        self.bytes_per_block = bytes_per_block
        self.swap_out_bytes_per_second = swap_out_bytes_per_second
        self.swap_in_bytes_per_second = swap_in_bytes_per_second
        self.sleep = sleep
        # Per live sequence: (how many of its token ids are hashed, the hash of those).
        self._hashes: dict[int, tuple[int, int]] = {}

    def reset(self) -> None:
        self.batch.reset()
        self._hashes.clear()

    def execute(self, plan: StepPlan) -> StepResult:
        started = time.perf_counter()
        try:
            self.batch.validate(plan)
        except PagewireError as error:
            log.warning("plan_rejected", step_id=plan.step_id, code=error.code.name, reason=str(error))
            return StepResult(step_id=plan.step_id, error=StepError(error.code.value[0], str(error)))
        for sequence_id in (*plan.finished_sequence_ids, *plan.preempted_sequence_ids):
            self._hashes.pop(sequence_id, None)
        for new in plan.new_sequences:
            self._hashes.pop(new.sequence_id, None)
        scheduled = self.batch.apply(plan)
        block_ops_seconds = self._swap_seconds(len(plan.swap_out), self.swap_out_bytes_per_second) + \
            self._swap_seconds(len(plan.swap_in), self.swap_in_bytes_per_second)
        num_context_tokens = sum(s.end for s in scheduled)
        forward_seconds = self.step_time.forward_seconds(plan.num_scheduled_tokens, num_context_tokens)
        self.sleep(block_ops_seconds + forward_seconds)
        outputs = tuple(self._advance(s) for s in scheduled)
        return StepResult(
            step_id=plan.step_id,
            outputs=outputs,
            timing=StepTiming(
                total_seconds=time.perf_counter() - started,
                forward_seconds=forward_seconds,
                sample_seconds=0.0,
                block_ops_seconds=block_ops_seconds,
                num_tokens=plan.num_scheduled_tokens,
            ),
        )

    def _swap_seconds(self, num_blocks: int, bytes_per_second: float) -> float:
        if num_blocks == 0 or bytes_per_second <= 0:
            return 0.0
        return num_blocks * self.bytes_per_block / bytes_per_second

    def _advance(self, s: ScheduledSequence) -> SequenceOutput:
        """Appends the sampled token; with drafts, verifies them as a real executor does: each is kept
        while it equals the token this executor samples there, then one sample of its own follows."""
        state = s.state
        state.num_computed_tokens = s.end
        if not s.samples:
            return SequenceOutput(sequence_id=state.sequence_id)
        token_ids: list[int] = []
        for draft in (*s.draft_token_ids, None):
            token_id = self._next_token(s)
            state.token_ids.append(token_id)
            token_ids.append(token_id)
            if token_id != draft:
                break
        state.num_computed_tokens -= len(s.draft_token_ids) - (len(token_ids) - 1)
        options = state.sampling
        if options.logprobs is None:
            return SequenceOutput(sequence_id=state.sequence_id, token_ids=tuple(token_ids))
        vocab_size = self.batch.limits.vocab_size
        tops = tuple(
            ((t, 0.0), *(((t + k) % vocab_size, RUNNER_UP_LOGPROB) for k in range(1, options.logprobs)))
            for t in token_ids
        ) if options.logprobs > 0 else ()
        return SequenceOutput(
            sequence_id=state.sequence_id, token_ids=tuple(token_ids), logprobs=(0.0,) * len(token_ids),
            top_logprobs=tops,
        )

    def _next_token(self, s: ScheduledSequence) -> int:
        state = s.state
        num_hashed, hashed = self._hashes.get(state.sequence_id, (0, _FNV_OFFSET))
        hashed = extend_hash(hashed, state.token_ids[num_hashed:])
        self._hashes[state.sequence_id] = (len(state.token_ids), hashed)
        vocab_size = self.batch.limits.vocab_size
        token_id = token_from_hash(hashed, vocab_size)
        options = state.sampling
        num_output_tokens = len(state.token_ids) - state.num_prompt_tokens
        if num_output_tokens < options.min_tokens:
            banned = set(options.banned_token_ids_before_min_tokens)
            while token_id in banned:
                token_id = (token_id + 1) % vocab_size
        return token_id
