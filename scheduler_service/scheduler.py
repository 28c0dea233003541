"""Continuous batching at iteration level: which sequences compute how many tokens in the next step."""

from __future__ import annotations

import bisect
from collections import deque

import structlog

from scheduler_service.in_flight_plans import InFlightPlans
from scheduler_service.kv_cache_manager import KVCacheManager
from scheduler_service.lora.slot_table import LoraSlotTable
from scheduler_service.plan_encoder import PlanEncoder
from scheduler_service.preemption_policy import PreemptionMode, PreemptionPolicy, TransferSpeeds
from scheduler_service.scheduler_config import SchedulerConfig
from scheduler_service.scheduler_counters import SchedulerCounters
from scheduler_service.scheduler_invariants import check_scheduler_invariants
from scheduler_service.sequence import Sequence, SequenceStatus
from scheduler_service.speculative.draft_acceptance import accept_drafts
from scheduler_service.speculative.draft_proposer import DraftProposer, ExecutorDraftModel
from scheduler_service.speculative.speculation_policy import SpeculationPolicy
from scheduler_service.swap_space import SwapSpace
from shared.step_plan import BlockId, BlockPairs, SequenceId, SequenceOutput, StepPlan, StepResult

log = structlog.get_logger(__name__)

BlockPair = tuple[BlockId, BlockId]


class StepRejected(RuntimeError):
    """The executor answered a plan with an error and changed nothing.

    The scheduler's view of the executor can no longer be trusted: replace the stream and call
    `reset_executor_state`. `adapter_slot`: the plan loaded an adapter into this slot that the
    executor could not read.
    """

    def __init__(self, message: str, adapter_slot: int | None = None) -> None:
        super().__init__(message)
        self.adapter_slot = adapter_slot


class Scheduler:
    """Decides each step which sequences compute how many tokens; composes the KV cache manager (with
    the prefix cache), the swap space, the preemption policy and the plan encoder.

    Tokens, not phases: every sequence computes `min(num_tokens - num_computed_tokens, budget)`
    tokens, so prefill, chunked prefill, prefix-cache hits, resume after preemption and decode are one
    code path. `num_computed_tokens` advances when a step is scheduled, not when its result arrives.

    Priority is arrival: `running` is kept in arrival order, and when blocks run out the latest-arrived
    running sequence is preempted (swap or recompute, see `_preempt`) to the front of `waiting`, so
    preempted work resumes before new admissions. A step that preempts admits nothing, so a plan
    carries swap_out pairs or swap_in pairs, never both. Invariants (`check_integrity`): a live sequence
    is in exactly one of `waiting` / `running`, both in arrival order; running tables cover their
    computed tokens; waiting sequences hold no device blocks; swapped ones, and only they, hold host
    blocks covering their computed tokens; the executor holds exactly the running sequences plus those
    whose end it has not yet been told.
    """

    def __init__(
        self, config: SchedulerConfig, kv_cache_manager: KVCacheManager, proposer: DraftProposer | None = None
    ) -> None:
        if kv_cache_manager.block_size != config.block_size:
            raise ValueError(
                f"KV cache manager block_size {kv_cache_manager.block_size} != config block_size "
                f"{config.block_size}; build both from the executor's CacheInfo"
            )
        if kv_cache_manager.block_pool.num_blocks != config.num_device_blocks:
            raise ValueError(
                f"block pool of {kv_cache_manager.block_pool.num_blocks} blocks != config "
                f"num_device_blocks {config.num_device_blocks}; build both from the executor's CacheInfo"
            )
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.swap_space = SwapSpace(config.num_host_blocks)
        self.preemption_policy = PreemptionPolicy(config.preemption_mode, config.transfer_speeds)
        self.plan_encoder = PlanEncoder()
        self.lora_slots = LoraSlotTable(config.max_loras)
        self.proposer = proposer
        self.speculation = SpeculationPolicy()
        self.counters = SchedulerCounters()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._sequences: dict[SequenceId, Sequence] = {}
        self._last_arrival_index: int | None = None
        self._finished_ids_to_send: list[SequenceId] = []
        self._in_flight = InFlightPlans()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        """Waiting sequences, swapped-out ones included."""
        return len(self.waiting)

    @property
    def num_swapped(self) -> int:
        return len(self.swap_space.sequence_ids())

    @property
    def num_preemptions(self) -> int:
        return self.counters.num_preemptions

    @property
    def num_prompt_tokens_computed(self) -> int:
        """Tokens at prompt positions scheduled so far, recomputation after preemption included."""
        return self.counters.num_prompt_tokens_computed

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def has_work(self) -> bool:
        """Whether a sequence is live or the executor still has to be told that one ended."""
        return bool(self.running or self.waiting or self._finished_ids_to_send)

    def get_sequence(self, sequence_id: SequenceId) -> Sequence | None:
        return self._sequences.get(sequence_id)

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a new sequence behind every waiting one; arrival indices must increase."""
        if seq.sequence_id in self._sequences:
            raise ValueError(f"sequence {seq.sequence_id} is already scheduled; use a fresh id")
        if seq.num_tokens > self.config.max_model_len:
            raise ValueError(
                f"sequence {seq.sequence_id} has {seq.num_tokens} tokens, more than max_model_len="
                f"{self.config.max_model_len}; shorten the prompt"
            )
        if self._last_arrival_index is not None and seq.arrival_index <= self._last_arrival_index:
            raise ValueError(
                f"arrival_index {seq.arrival_index} is not after the previous {self._last_arrival_index}"
            )
        if seq.adapter is not None and not self.config.max_loras:
            raise ValueError(f"sequence {seq.sequence_id} uses adapter {seq.adapter.name} but LoRA is off here")
        assert seq.status is SequenceStatus.WAITING and seq.num_computed_tokens == 0
        self._last_arrival_index = seq.arrival_index
        self._sequences[seq.sequence_id] = seq
        self.waiting.append(seq)

    def schedule(self) -> StepPlan | None:
        """Decide the next step and return its plan; None when nothing is to compute or tell.

        Running sequences go first, in arrival order, then waiting sequences are admitted in order
        while the token budget, the sequence cap and the free blocks last; the first that does not fit
        stops admission (so does one whose adapter finds no free LoRA slot: no request waits behind
        later ones, so none starves), and none follows a preemption in the same step. A swapped-out sequence is
        admitted by swapping its blocks back in; any other starts from its longest cached prefix.
        Admission in arrival order keeps every running sequence ahead of every waiting one, so a
        partially computed prompt is always the latest-arrived running sequence: decodes come before
        it and never stall behind it.

        A running sequence whose sampled token is still in flight is scheduled anyway, one token: the
        placeholder, whose id only the executor knows yet (it appended it). Its block and the
        max_model_len check count it like a known token. No placeholder step is scheduled once the
        tokens in flight reach `Sequence.num_tokens_limit`; a stop the scheduler cannot foresee (a stop token
        or string) costs one step whose output `apply_result` drops.
        """
        budget = self.config.max_num_batched_tokens
        scheduled: dict[SequenceId, int] = {}
        preempted_ids: list[SequenceId] = []
        swap_out: list[BlockPair] = []
        swap_in: list[BlockPair] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.num_draft_tokens or seq.status is not SequenceStatus.RUNNING or seq.num_uncomputed_tokens == 0:
                continue  # (drafts: its verification is in flight; how far it got is not known yet)
            end = seq.num_tokens_limit(self.config.max_model_len)
            if seq.num_output_placeholders and seq.num_tokens_with_placeholders >= end:
                continue
            num_new_tokens = min(seq.num_uncomputed_tokens, budget)
            is_decode = num_new_tokens == seq.num_uncomputed_tokens == 1
            drafts, num_model_drafts = self._drafts(seq, budget) if is_decode else ((), 0)
            num_new_tokens += len(drafts) + num_model_drafts
            victims = self._allocate_or_preempt(seq, seq.num_computed_tokens + num_new_tokens, swap_out)
            preempted_ids.extend(victim.sequence_id for victim in victims)
            if seq.status is SequenceStatus.RUNNING:
                self._cache_computed_blocks(seq, seq.num_computed_tokens + num_new_tokens)
                seq.draft_token_ids, seq.num_model_drafts = drafts, num_model_drafts
                scheduled[seq.sequence_id] = num_new_tokens
                budget -= num_new_tokens

        while (
            not preempted_ids and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if seq.adapter is not None and (slot := self.lora_slots.acquire(seq.adapter)) is None:
                break  # every LoRA slot is pinned by other adapters: it waits for one to free up
            if seq.status is SequenceStatus.SWAPPED:
                num_new_tokens = self._swap_in(seq, budget, swap_in)
            else:
                num_new_tokens = self._admit(seq, budget)
            if num_new_tokens is None:
                if seq.adapter is not None:
                    self.lora_slots.release(slot)
                break
            if seq.adapter is not None:
                seq.lora_slot = slot
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.arrival_index)
            self._cache_computed_blocks(seq, seq.num_computed_tokens + num_new_tokens)
            scheduled[seq.sequence_id] = num_new_tokens
            budget -= num_new_tokens

        # Host blocks read by a swap_in are free again at once: safe only because no swap_out (which
        # the executor runs first) shares the plan.
        assert not (swap_out and swap_in), "a plan swaps out and in"
        finished_ids, self._finished_ids_to_send = self._finished_ids_to_send, []
        if not scheduled and not finished_ids and not preempted_ids:
            return None
        kv = self.kv_cache_manager
        plan = self.plan_encoder.encode(
            [(self._sequences[sid], num, kv.block_ids(sid)) for sid, num in scheduled.items()],
            finished_ids,
            preempted_ids,
            swap_out=BlockPairs.of(swap_out),
            swap_in=BlockPairs.of(swap_in),
            adapter_loads=self.lora_slots.take_loads(),
        )
        samples: dict[SequenceId, bool] = {}
        for sid, num_new_tokens in scheduled.items():
            seq = self._sequences[sid]
            start = seq.num_computed_tokens
            end = start + num_new_tokens
            self.counters.num_prompt_tokens_computed += max(0, min(end, seq.num_prompt_tokens) - start)
            self.counters.num_tokens_recomputed += max(0, min(end, seq.recompute_until) - start)
            seq.num_computed_tokens = end
            samples[sid] = end - seq.num_draft_tokens == seq.num_tokens_with_placeholders
            seq.num_output_placeholders += samples[sid]
        self._in_flight.append(plan, samples)
        return plan

    def _drafts(self, seq: Sequence, budget: int) -> tuple[tuple[int, ...], int]:
        """(draft tokens, model drafts to ask the executor for) for a decode of a sequence the executor
        holds with nothing in flight: at most what the token budget and the sequence's end leave (the
        step samples one token past them)."""
        if (self.proposer is None or not seq.speculative or seq.num_output_placeholders
                or not self.plan_encoder.knows(seq.sequence_id)):
            return (), 0
        end = seq.num_tokens_limit(self.config.max_model_len)
        limit = min(self.proposer.num_speculative_tokens, budget - 1, end - seq.num_tokens - 1)
        k = self.speculation.draft_length(seq.draft_acceptance, limit, len(self.running))
        if not self.speculation.worth_drafting(seq.draft_acceptance, len(self.running)):
            seq.draft_acceptance = self.speculation.recovered(seq.draft_acceptance)
        if k == 0 or isinstance(self.proposer, ExecutorDraftModel):
            return (), k
        return self.proposer.propose(seq.token_ids, k), 0

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Give a waiting (not swapped) sequence its longest cached prefix and blocks for the next
        `budget` tokens at most; returns the tokens to compute, or None (holding nothing) when the
        blocks are not free."""
        kv = self.kv_cache_manager
        num_cached_tokens = kv.allocate_cached_prefix(seq.sequence_id, seq.token_ids, seq.cache_extra_keys)
        num_new_tokens = min(seq.num_tokens - num_cached_tokens, budget)
        assert num_new_tokens > 0, f"waiting sequence {seq.sequence_id} has nothing to compute"
        if kv.allocate_slots(seq.sequence_id, num_cached_tokens + num_new_tokens) is None:
            kv.free(seq.sequence_id)
            return None
        seq.num_computed_tokens = num_cached_tokens
        num_cached_prompt_tokens = min(num_cached_tokens, seq.num_prompt_tokens)
        if seq.num_cached_prompt_tokens is None:
            seq.num_cached_prompt_tokens = num_cached_prompt_tokens
        self.counters.num_prompt_tokens_cached += num_cached_prompt_tokens
        return num_new_tokens

    def _swap_in(self, seq: Sequence, budget: int, swap_in: list[BlockPair]) -> int | None:
        """Give a swapped-out sequence fresh device blocks, record the host -> device pairs that bring
        its K/V back and free its host blocks; returns the tokens to compute, or None (changing
        nothing) when the device blocks are not free.

        At least one token is computed, so the step samples: if the sequence's last sampled token was
        dropped in flight when it was preempted, its computed tokens reach the end of its known
        tokens and the last one is computed again (same K/V, same slot).
        """
        kv = self.kv_cache_manager
        num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
        num_new_tokens = min(seq.num_tokens - num_computed_tokens, budget)
        device_block_ids = kv.allocate_slots(seq.sequence_id, num_computed_tokens + num_new_tokens)
        if device_block_ids is None:
            return None
        host_block_ids = self.swap_space.block_ids(seq.sequence_id)
        assert len(device_block_ids) >= len(host_block_ids)
        swap_in.extend(zip(host_block_ids, device_block_ids))
        self.swap_space.free(seq.sequence_id)
        self.counters.num_blocks_swapped_in += len(host_block_ids)
        seq.num_computed_tokens = num_computed_tokens
        return num_new_tokens

    def _cache_computed_blocks(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Offer the blocks this step fills to the prefix cache as soon as it is scheduled, so that a
        sequence admitted later in the same step can reuse them (see `cache_full_blocks`). A block
        holding a placeholder is offered by a later step, once every id in it is known."""
        kv = self.kv_cache_manager
        num_computed_tokens = min(num_computed_tokens, seq.num_tokens)
        # Building token_ids costs O(tokens): only when a block filled up since the last offer.
        num_full_blocks = num_computed_tokens // kv.block_size
        if kv.enable_prefix_caching and num_full_blocks > kv.num_offered_blocks(seq.sequence_id):
            kv.cache_full_blocks(seq.sequence_id, seq.token_ids, num_computed_tokens, seq.cache_extra_keys)

    def _allocate_or_preempt(
        self, seq: Sequence, num_tokens: int, swap_out: list[BlockPair]
    ) -> list[Sequence]:
        """Grow `seq`'s table to `num_tokens`, preempting the latest-arrived running sequence until it
        fits; returns the victims, ending with `seq` itself when it was the latest left. Running is in
        arrival order and scheduled front to back, so a victim was never scheduled earlier this step.

        Cannot livelock: the config guarantees the pool holds one max_model_len sequence alone.
        """
        victims: list[Sequence] = []
        while self.kv_cache_manager.allocate_slots(seq.sequence_id, num_tokens) is None:
            victim = self.running[-1]
            self._preempt(victim, swap_out)
            victims.append(victim)
            if victim is seq:
                break
        return victims

    def _preempt(self, victim: Sequence, swap_out: list[BlockPair]) -> None:
        """Take the latest-arrived running sequence off the device by swap or recompute, as the
        preemption policy chooses (logged with both cost estimates); its device blocks are free on
        return, and it waits at the front of the queue.

        Swap: the blocks holding its computed tokens are copied to host blocks by this plan's
        swap_out, which the executor runs before anything else touches device blocks, so they can be
        handed to another sequence in the same plan. It keeps its computed tokens (SWAPPED).
        Recompute: its computed tokens are dropped (its full blocks stay in the prefix cache until
        evicted, making the recompute cheaper); it is re-sent in full later, prompt and outputs so far.

        Tokens it samples in plans still in flight are dropped (`apply_result` ignores them, no client
        saw them) and sampled again after it resumes; its placeholder positions are forgotten, so it
        keeps exactly the known tokens, all of whose K/V the plans before this one compute.
        """
        assert victim is self.running[-1], "only the latest-arrived running sequence is preempted"
        assert self.plan_encoder.knows(victim.sequence_id), f"executor does not hold {victim.sequence_id}"
        kv = self.kv_cache_manager
        victim.num_computed_tokens = min(victim.num_computed_tokens, victim.num_tokens)
        victim.num_output_placeholders = 0
        victim.drop_drafts()
        num_blocks = -(-victim.num_computed_tokens // kv.block_size)
        num_tokens_to_recompute = max(1, victim.num_tokens - kv.num_shared_prefix_tokens(victim.sequence_id))
        decision = self.preemption_policy.choose(
            num_blocks=num_blocks,
            num_tokens_to_recompute=num_tokens_to_recompute,
            num_free_host_blocks=self.swap_space.num_free_blocks,
        )
        log.info(
            "sequence_preempted",
            sequence_id=victim.sequence_id,
            mode=decision.mode.value,
            reason=decision.reason,
            swap_seconds=decision.swap_seconds,
            recompute_seconds=decision.recompute_seconds,
            num_blocks=num_blocks,
            num_tokens_to_recompute=num_tokens_to_recompute,
        )
        self.running.pop()
        self._unpin_lora_slot(victim)
        if decision.mode is PreemptionMode.SWAP:
            host_block_ids = self.swap_space.allocate(victim.sequence_id, num_blocks)
            assert host_block_ids is not None, "the policy swapped with too few free host blocks"
            swap_out.extend(zip(kv.block_ids(victim.sequence_id)[:num_blocks], host_block_ids))
            victim.status = SequenceStatus.SWAPPED
            self.counters.num_preemptions_swap += 1
            self.counters.num_blocks_swapped_out += num_blocks
        else:
            victim.recompute_until = max(victim.recompute_until, victim.num_computed_tokens)
            victim.num_computed_tokens = 0
            victim.status = SequenceStatus.WAITING
            self.counters.num_preemptions_recompute += 1
        kv.free(victim.sequence_id)
        victim.num_preemptions += 1
        self.waiting.appendleft(victim)
        self._in_flight.forget(victim.sequence_id)

    def apply_result(self, result: StepResult) -> list[SequenceOutput]:
        """Append the sampled tokens of the oldest plan in flight; return the outputs that carry tokens.

        Outputs of sequences that ended or were preempted since the plan was sent are dropped (with
        plans in flight, a sequence that stopped still has the step after its stop computed). Raises
        StepRejected when the executor rejected the plan. With speculation on, the policy learns from
        the step's timing."""
        step_id = result.step_id
        sent = self._in_flight.pop_oldest(step_id)
        samples = sent.samples
        if result.error is not None:
            raise StepRejected(
                f"executor rejected step {step_id} (status {result.error.code}): {result.error.message}",
                result.error.adapter_slot,
            )
        outputs: list[SequenceOutput] = []
        for output in result.outputs:
            expects_token = samples.pop(output.sequence_id, None)
            if expects_token is None:
                continue
            seq = self._sequences[output.sequence_id]
            num_expected = int(expects_token)
            if seq.num_draft_tokens:
                accept_drafts(seq, output, self.speculation, self.counters)
            else:
                assert len(output.token_ids) == num_expected, (
                    f"sequence {output.sequence_id}: {len(output.token_ids)} tokens, expected {num_expected}"
                )
            if output.token_ids:
                seq.output_token_ids.extend(output.token_ids)
                seq.num_output_placeholders -= 1
                assert seq.num_tokens <= self.config.max_model_len, f"{seq.sequence_id} outgrew max_model_len"
                outputs.append(output)
        assert not any(samples.values()), f"step {step_id} result lacks tokens for {sorted(samples)}"
        if self.proposer is not None:
            self.speculation.observe_step(sent, result)
        return outputs

    def finish_sequence(self, sequence_id: SequenceId) -> None:
        """End a live sequence (the engine found a stop condition); raises KeyError for an unknown id."""
        self._end(self._sequences[sequence_id])

    def abort_sequence(self, sequence_id: SequenceId) -> bool:
        """End a sequence in any state (client cancelled); False when it had already ended."""
        seq = self._sequences.get(sequence_id)
        if seq is None:
            return False
        self._end(seq)
        return True

    def _end(self, seq: Sequence) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._unpin_lora_slot(seq)
        else:
            self.waiting.remove(seq)
        self.kv_cache_manager.free(seq.sequence_id)
        self.swap_space.free(seq.sequence_id)
        seq.status = SequenceStatus.FINISHED
        seq.num_output_placeholders = 0
        seq.drop_drafts()
        del self._sequences[seq.sequence_id]
        self._in_flight.forget(seq.sequence_id)
        if self.plan_encoder.knows(seq.sequence_id):
            self._finished_ids_to_send.append(seq.sequence_id)

    def _unpin_lora_slot(self, seq: Sequence) -> None:
        if seq.lora_slot is not None:
            self.lora_slots.release(seq.lora_slot)
            seq.lora_slot = None

    def use_transfer_speeds(self, speeds: TransferSpeeds) -> None:
        """Later preemption choices use `speeds`: what a reconnected executor measured at its start-up,
        which differs from before when it restarted on other hardware or under other load."""
        self.preemption_policy.speeds = speeds

    def reset_executor_state(self) -> None:
        """The stream to the executor was replaced and the new one holds nothing: every running sequence
        goes back to the front of the queue for recompute, and plans in flight are forgotten.

        The executor's K/V cannot be trusted either (it may have restarted, and a rejected plan never
        wrote the blocks it was to fill), so the prefix cache is emptied and swapped-out sequences fall
        back to recompute, their host blocks freed.
        """
        for seq in reversed(self.running):
            self._unpin_lora_slot(seq)
            self.waiting.appendleft(seq)
        self.running.clear()
        self.lora_slots.reset()
        for seq in self.waiting:
            self.kv_cache_manager.free(seq.sequence_id)
            self.swap_space.free(seq.sequence_id)
            seq.recompute_until = max(seq.recompute_until, min(seq.num_computed_tokens, seq.num_tokens))
            seq.num_computed_tokens = 0
            seq.num_output_placeholders = 0
            seq.drop_drafts()
            seq.status = SequenceStatus.WAITING
        self.kv_cache_manager.reset_prefix_cache()
        self.plan_encoder.reset()
        self._finished_ids_to_send.clear()
        self._in_flight.clear()

    def evacuate(self) -> list[Sequence]:
        """Hand every live sequence over, in arrival order (the executor is gone): each leaves this
        scheduler waiting, with nothing computed and no block held (`reset_executor_state`), keeping
        its output tokens, so that another scheduler adds it like a new one and recomputes prompt and
        outputs, exactly as after a recompute preemption."""
        self.reset_executor_state()
        sequences = list(self.waiting)
        self.waiting.clear()
        self._sequences.clear()
        return sequences

    def check_integrity(self) -> None:
        check_scheduler_invariants(self)
