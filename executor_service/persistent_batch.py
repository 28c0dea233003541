"""The executor's persistent batch: what it knows of every live sequence, updated by plan deltas."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import FailedPrecondition, InvalidArgument
from shared.sampling_params import validate_sampling_options
from shared.step_plan import AdapterLoad, BlockPairs, SamplingOptions, SequenceId, StepPlan


@dataclass(slots=True)
class SequenceState:
    """One live sequence. `token_ids[:num_computed_tokens]` have K/V in `block_ids`.

    The executor appends each token it samples, so `num_computed_tokens` stays one behind the end
    after a sampling step and the next decode computes exactly that token. With a draft model,
    `token_ids[:num_draft_computed_tokens]` have the draft's K/V in its own pool under the same
    `block_ids`; never more than `num_computed_tokens` between steps, and behind it while the
    sequence drafts nothing (the draft catches up when it does).
    """

    sequence_id: SequenceId
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed_tokens: int
    block_ids: list[int]
    sampling: SamplingOptions
    lora_slot: int | None
    num_draft_computed_tokens: int = 0

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    """A sequence computing `num_tokens` tokens from `start` this step: known tokens, then its
    `draft_token_ids` (speculative decoding), which the step verifies.

    `num_model_drafts` > 0: the draft model proposes that many drafts this step; until it has (and
    filled `draft_token_ids` with them), `num_tokens` counts drafts not yet known, so `samples` and
    `input_token_ids` are only meaningful after the draft model ran."""

    state: SequenceState
    start: int
    num_tokens: int
    draft_token_ids: tuple[int, ...] = ()
    num_model_drafts: int = 0

    @property
    def num_known_tokens(self) -> int:
        """Of the tokens computed this step, those that are no draft."""
        return self.num_tokens - max(len(self.draft_token_ids), self.num_model_drafts)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the known tokens (and drafts), so a token is sampled."""
        return self.end == len(self.state.token_ids) + len(self.draft_token_ids)

    @property
    def input_token_ids(self) -> list[int]:
        """The token ids this step computes, drafts last."""
        if not self.draft_token_ids:
            return self.state.token_ids[self.start : self.end]
        return [*self.state.token_ids[self.start :], *self.draft_token_ids]


@dataclass(frozen=True, slots=True)
class BatchLimits:
    """What a plan may ask of this executor."""

    vocab_size: int
    block_size: int
    num_device_blocks: int
    num_host_blocks: int
    max_model_len: int
    max_num_batched_tokens: int
    max_num_seqs: int
    max_logprobs: int
    # LoRA slots on the device; 0: LoRA is off and a plan may carry no adapter load or slot.
    max_loras: int = 0
    # Most model drafts per sequence and step; 0: no draft model, and a plan may ask for none.
    max_model_drafts: int = 0


class PersistentBatch:
    """Live sequences by id. `validate` checks a whole plan first, so `apply` never half-applies one."""

    def __init__(self, limits: BatchLimits) -> None:
        self.limits = limits
        self.sequences: dict[SequenceId, SequenceState] = {}
        self.last_step_id = 0

    def reset(self) -> None:
        """Forgets every sequence (the stream that owned them ended)."""
        self.sequences.clear()
        self.last_step_id = 0

    def validate(self, plan: StepPlan) -> None:
        """Raises InvalidArgument (malformed) or FailedPrecondition (unknown state); changes nothing."""
        limits = self.limits
        if plan.step_id <= self.last_step_id:
            raise InvalidArgument(f"step_id {plan.step_id} is not greater than the previous {self.last_step_id}")
        dropped = set(plan.finished_sequence_ids) | set(plan.preempted_sequence_ids)
        for sequence_id in dropped:
            if sequence_id not in self.sequences:
                raise FailedPrecondition(f"sequence {sequence_id} is not held by this executor; cannot drop it")
        self._validate_pairs("swap_out", plan.swap_out, limits.num_device_blocks, limits.num_host_blocks)
        self._validate_pairs("swap_in", plan.swap_in, limits.num_host_blocks, limits.num_device_blocks)
        self._validate_pairs("copy", plan.copy, limits.num_device_blocks, limits.num_device_blocks)
        self._validate_adapter_loads(plan.adapter_loads, dropped)
        seen: set[int] = set()
        for new in plan.new_sequences:
            if new.sequence_id in seen:
                raise InvalidArgument(f"sequence {new.sequence_id} appears twice in step {plan.step_id}")
            seen.add(new.sequence_id)
            if new.sequence_id in self.sequences and new.sequence_id not in dropped:
                raise FailedPrecondition(f"sequence {new.sequence_id} is already held; send it as continued")
            if not new.token_ids:
                raise InvalidArgument(f"sequence {new.sequence_id} has no tokens")
            if len(new.token_ids) > limits.max_model_len:
                raise InvalidArgument(
                    f"sequence {new.sequence_id} has {len(new.token_ids)} tokens, more than max_model_len "
                    f"{limits.max_model_len}"
                )
            bad = [t for t in new.token_ids if not 0 <= t < limits.vocab_size]
            if bad:
                raise InvalidArgument(
                    f"sequence {new.sequence_id}: token ids {bad[:5]} outside the vocabulary [0, {limits.vocab_size})"
                )
            if not 1 <= new.num_prompt_tokens <= len(new.token_ids):
                raise InvalidArgument(
                    f"sequence {new.sequence_id}: num_prompt_tokens {new.num_prompt_tokens} must be in "
                    f"[1, {len(new.token_ids)}]"
                )
            validate_sampling_options(new.sampling, limits.vocab_size, limits.max_logprobs)
            if new.lora_slot is not None:
                self._validate_slot(f"sequence {new.sequence_id}: lora_slot", new.lora_slot)
            self._validate_span(
                new.sequence_id, new.num_computed_tokens, new.num_scheduled_tokens,
                len(new.token_ids), len(new.block_ids), new.block_ids,
            )
        for cont in plan.continued_sequences:
            if cont.sequence_id in seen:
                raise InvalidArgument(f"sequence {cont.sequence_id} appears twice in step {plan.step_id}")
            seen.add(cont.sequence_id)
            state = self.sequences.get(cont.sequence_id)
            if state is None or cont.sequence_id in dropped:
                raise FailedPrecondition(
                    f"sequence {cont.sequence_id} is not held by this executor; send it as new"
                )
            num_drafts = len(cont.draft_token_ids) + cont.num_model_drafts
            if cont.num_model_drafts:
                self._validate_model_drafts(cont.sequence_id, cont.draft_token_ids, cont.num_model_drafts)
            if num_drafts:
                self._validate_drafts(cont.sequence_id, num_drafts, cont.draft_token_ids, state,
                                      cont.num_scheduled_tokens)
            self._validate_span(
                cont.sequence_id, state.num_computed_tokens, cont.num_scheduled_tokens,
                len(state.token_ids) + num_drafts, len(state.block_ids) + len(cont.new_block_ids),
                cont.new_block_ids,
            )
        if len(seen) > limits.max_num_seqs:
            raise InvalidArgument(f"{len(seen)} sequences in one step exceed max_num_seqs {limits.max_num_seqs}")
        if plan.num_scheduled_tokens > limits.max_num_batched_tokens:
            raise InvalidArgument(
                f"{plan.num_scheduled_tokens} tokens in one step exceed max_num_batched_tokens "
                f"{limits.max_num_batched_tokens}"
            )

    def _validate_drafts(
        self, sequence_id: int, num_drafts: int, draft_token_ids: tuple[int, ...], state: SequenceState,
        num_scheduled: int,
    ) -> None:
        """Drafts follow the known tokens and are all computed this step, which reaches their end."""
        bad = [t for t in draft_token_ids if not 0 <= t < self.limits.vocab_size]
        if bad:
            raise InvalidArgument(
                f"sequence {sequence_id}: draft token ids {bad[:5]} outside the vocabulary [0, {self.limits.vocab_size})"
            )
        num_tokens = len(state.token_ids) + num_drafts
        if state.num_computed_tokens + num_scheduled != num_tokens:
            raise InvalidArgument(
                f"sequence {sequence_id}: a step with {num_drafts} draft tokens must compute up to their "
                f"end: {state.num_computed_tokens} computed + {num_scheduled} scheduled != {num_tokens}"
            )

    def _validate_model_drafts(self, sequence_id: int, draft_token_ids: tuple[int, ...], num_model_drafts: int) -> None:
        limits = self.limits
        if limits.max_model_drafts == 0:
            raise InvalidArgument(
                f"sequence {sequence_id}: {num_model_drafts} model drafts asked of an executor without a draft "
                "model (start it with --speculative-config '{\"method\": \"draft_model\", ...}')"
            )
        if num_model_drafts > limits.max_model_drafts:
            raise InvalidArgument(
                f"sequence {sequence_id}: {num_model_drafts} model drafts exceed this executor's "
                f"num_speculative_tokens {limits.max_model_drafts}"
            )
        if draft_token_ids:
            raise InvalidArgument(f"sequence {sequence_id}: send draft_token_ids or num_model_drafts, not both")

    def _validate_slot(self, what: str, slot: int) -> None:
        if self.limits.max_loras == 0:
            raise InvalidArgument(f"{what} {slot}: LoRA is off on this executor (start it with --enable-lora)")
        if not 0 <= slot < self.limits.max_loras:
            raise InvalidArgument(f"{what} {slot} out of range [0, {self.limits.max_loras})")

    def _validate_adapter_loads(self, loads: tuple[AdapterLoad, ...], dropped: set[int]) -> None:
        """Each load names a slot in range, once per plan, that no sequence kept past this plan's
        drops uses (a load replaces the slot's adapter under it)."""
        loaded: set[int] = set()
        for load in loads:
            self._validate_slot(f"adapter load {load.adapter_name!r} into slot", load.slot)
            if load.slot in loaded:
                raise InvalidArgument(f"two adapter loads into LoRA slot {load.slot} in one step")
            if not load.adapter_name or not load.adapter_path:
                raise InvalidArgument(f"the adapter load into slot {load.slot} needs an adapter_name and a path")
            loaded.add(load.slot)
        if loaded:
            for state in self.sequences.values():
                if state.lora_slot in loaded and state.sequence_id not in dropped:
                    raise InvalidArgument(
                        f"adapter load into LoRA slot {state.lora_slot} while sequence {state.sequence_id} "
                        "uses it; finish or preempt the sequence first"
                    )

    def _validate_span(
        self, sequence_id: int, num_computed: int, num_scheduled: int, num_tokens: int,
        num_blocks: int, sent_block_ids: tuple[int, ...],
    ) -> None:
        limits = self.limits
        max_blocks = -(-limits.max_model_len // limits.block_size)
        if num_blocks > max_blocks:
            raise InvalidArgument(
                f"sequence {sequence_id}: {num_blocks} blocks, more than the {max_blocks} max_model_len "
                f"{limits.max_model_len} needs"
            )
        bad = [b for b in sent_block_ids if not 0 <= b < limits.num_device_blocks]
        if bad:
            raise InvalidArgument(
                f"sequence {sequence_id}: block ids {bad[:5]} out of range [0, {limits.num_device_blocks})"
            )
        if num_scheduled < 1:
            raise InvalidArgument(f"sequence {sequence_id}: schedule at least one token")
        end = num_computed + num_scheduled
        if end > num_tokens:
            raise InvalidArgument(
                f"sequence {sequence_id}: too many tokens: {num_computed} computed + {num_scheduled} scheduled "
                f"> {num_tokens} known"
            )
        if end > limits.max_model_len:
            raise InvalidArgument(f"sequence {sequence_id}: {end} tokens exceed max_model_len {limits.max_model_len}")
        if end > num_blocks * limits.block_size:
            raise InvalidArgument(
                f"sequence {sequence_id}: {num_blocks} blocks hold {num_blocks * limits.block_size} tokens, "
                f"fewer than the {end} it needs after this step"
            )

    @staticmethod
    def _validate_pairs(name: str, pairs: BlockPairs, num_src: int, num_dst: int) -> None:
        for src, dst in pairs.pairs():
            if not (0 <= src < num_src and 0 <= dst < num_dst):
                raise InvalidArgument(
                    f"{name} pair ({src}, {dst}) out of range: src in [0, {num_src}), dst in [0, {num_dst})"
                )

    def apply(self, plan: StepPlan) -> list[ScheduledSequence]:
        """Applies a validated plan's sequence deltas; returns the sequences to compute, in plan order."""
        self.last_step_id = plan.step_id
        for sequence_id in (*plan.finished_sequence_ids, *plan.preempted_sequence_ids):
            self.sequences.pop(SequenceId(sequence_id), None)
        scheduled: list[ScheduledSequence] = []
        for new in plan.new_sequences:
            state = SequenceState(
                sequence_id=new.sequence_id,
                token_ids=list(new.token_ids),
                num_prompt_tokens=new.num_prompt_tokens,
                num_computed_tokens=new.num_computed_tokens,
                block_ids=list(new.block_ids),
                sampling=new.sampling,
                lora_slot=new.lora_slot,
                # Only what the draft model computes for it from now on: a prefix hit's or a swap-in's
                # blocks may hold no draft K/V (DraftModelRunner catches up when the sequence drafts).
                num_draft_computed_tokens=0,
            )
            self.sequences[new.sequence_id] = state
            scheduled.append(ScheduledSequence(state, new.num_computed_tokens, new.num_scheduled_tokens))
        for cont in plan.continued_sequences:
            state = self.sequences[cont.sequence_id]
            state.block_ids.extend(cont.new_block_ids)
            scheduled.append(ScheduledSequence(
                state, state.num_computed_tokens, cont.num_scheduled_tokens, tuple(cont.draft_token_ids),
                cont.num_model_drafts,
            ))
        return scheduled
