"""Executes one step plan: validate, block ops, forward over the flattened batch, sample."""

from __future__ import annotations

import time

import structlog
import torch

from executor_service.draft_model_runner import DraftModelRunner
from executor_service.input_builder import build_model_input
from executor_service.kv_pool import KVPool
from executor_service.lora.lora_manager import AdapterUnreadable, LoraManager, PreparedLoad
from executor_service.model.llama import LlamaForCausalLM
from executor_service.persistent_batch import BatchLimits, PersistentBatch, ScheduledSequence
from executor_service.sampler import Sampler, SamplingRow
from shared.errors import PagewireError
from shared.step_plan import SequenceOutput, StepError, StepPlan, StepResult, StepTiming

log = structlog.get_logger(__name__)


class ModelRunner:
    """Owns the persistent batch and runs plans against the model and the KV pool, one at a time.

    Contract: `execute` answers every plan. A plan that fails validation changes nothing and is
    answered with its error; an unexpected failure during execution is answered INTERNAL and the
    persistent batch is dropped, since it may be half-updated (the scheduler re-sends everything).
    With `lora` (None: LoRA off), a plan's adapters are read before anything changes, so a broken
    adapter rejects the plan, and are copied into their slots after the block ops, before the forward.
    With `draft` (draft_model speculation), the block ops move the draft pool's blocks too (both pools
    stay in step), and the draft model proposes its drafts before the target's forward verifies them.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_pool: KVPool,
        sampler: Sampler,
        limits: BatchLimits,
        device: torch.device,
        lora: LoraManager | None = None,
        draft: DraftModelRunner | None = None,
    ) -> None:
        num_slots = lora.max_loras if lora is not None else 0
        if num_slots != limits.max_loras:
            raise ValueError(f"limits allow {limits.max_loras} LoRA slots but the LoRA manager has {num_slots}")
        self.model = model
        self.kv_pool = kv_pool
        self.sampler = sampler
        self.batch = PersistentBatch(limits)
        self.device = device
        self.lora = lora
        self.draft = draft

    def reset(self) -> None:
        self.batch.reset()
        if self.lora is not None:
            self.lora.reset()

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        started = time.perf_counter()
        try:
            self.batch.validate(plan)
            adapter_loads = self.lora.prepare(plan) if self.lora is not None else ()
        except PagewireError as error:
            log.warning("plan_rejected", step_id=plan.step_id, code=error.code.name, reason=str(error))
            slot = error.slot if isinstance(error, AdapterUnreadable) else None
            return StepResult(step_id=plan.step_id, error=StepError(error.code.value[0], str(error), slot))
        try:
            return self._execute_valid(plan, adapter_loads, started)
        except Exception as error:  # noqa: BLE001 (answer the plan; the stream must not die)
            log.exception("step_failed", step_id=plan.step_id)
            self.reset()
            return StepResult(step_id=plan.step_id, error=StepError(13, f"step failed: {error!r}"))

    def _execute_valid(
        self, plan: StepPlan, adapter_loads: tuple[PreparedLoad, ...], started: float
    ) -> StepResult:
        scheduled = self.batch.apply(plan)
        block_ops_started = time.perf_counter()
        for kv_pool in (self.kv_pool,) if self.draft is None else (self.kv_pool, self.draft.kv_pool):
            kv_pool.swap_out(plan.swap_out)
            kv_pool.swap_in(plan.swap_in)
            kv_pool.copy(plan.copy)
        if self.lora is not None:
            self.lora.load(adapter_loads)
        draft_started = time.perf_counter()
        if self.draft is not None and scheduled:
            scheduled = self.draft.propose(scheduled, self.device)
        forward_started = time.perf_counter()
        sampled: dict[int, list[Sample]] = {}
        sample_seconds = 0.0
        if scheduled:
            model_input = build_model_input(scheduled, self.kv_pool.geometry.block_size, self.device)
            lora = (
                None if self.lora is None
                else self.lora.batch(model_input.lora_segments, model_input.metadata.num_tokens)
            )
            hidden = self.model(
                model_input.input_ids, model_input.positions, self.kv_pool.device_caches, model_input.metadata,
                lora,
            )
            logits = self.model.compute_logits(hidden[model_input.logits_indices])
            sample_started = time.perf_counter()
            rows = [row for i in model_input.sampling_seq_indices for row in self._sampling_rows(scheduled[i])]
            if rows:
                output = self.sampler.sample(logits, rows)
                row = 0
                for i in model_input.sampling_seq_indices:
                    num_rows = 1 + len(scheduled[i].draft_token_ids)
                    samples = [
                        (output.token_ids[r], output.logprobs[r], output.top_logprobs[r])
                        for r in range(row, row + num_rows)
                    ]
                    sampled[i] = _accepted(samples, scheduled[i].draft_token_ids)
                    row += num_rows
            sample_seconds = time.perf_counter() - sample_started
        forward_seconds = time.perf_counter() - forward_started - sample_seconds
        outputs = tuple(self._advance(s, sampled.get(i)) for i, s in enumerate(scheduled))
        if self.draft is not None:
            self.draft.settle(scheduled)
        return StepResult(
            step_id=plan.step_id,
            outputs=outputs,
            timing=StepTiming(
                total_seconds=time.perf_counter() - started,
                forward_seconds=forward_seconds,
                sample_seconds=sample_seconds,
                block_ops_seconds=draft_started - block_ops_started,
                num_tokens=plan.num_scheduled_tokens,
                draft_seconds=forward_started - draft_started,
            ),
        )

    @staticmethod
    def _sampling_rows(s: ScheduledSequence) -> list[SamplingRow]:
        """One row per position that samples: after the known tokens, and after each draft prefix
        (the history a draft token extends, were it accepted)."""
        state = s.state
        prompt, outputs = state.token_ids[: state.num_prompt_tokens], state.output_token_ids
        return [
            SamplingRow(
                options=state.sampling,
                output_position=len(outputs) + j,
                prompt_token_ids=prompt,
                output_token_ids=[*outputs, *s.draft_token_ids[:j]] if j else outputs,
            )
            for j in range(len(s.draft_token_ids) + 1)
        ]

    @staticmethod
    def _advance(s: ScheduledSequence, samples: list[Sample] | None) -> SequenceOutput:
        """Moves the sequence past the computed tokens and appends the tokens it sampled, if any. Of
        draft positions, only the accepted ones count as computed: the next step overwrites the rest."""
        state = s.state
        state.num_computed_tokens = s.end
        if samples is None:
            return SequenceOutput(sequence_id=state.sequence_id)
        state.num_computed_tokens -= len(s.draft_token_ids) - (len(samples) - 1)
        state.token_ids.extend(token_id for token_id, _, _ in samples)
        return SequenceOutput(
            sequence_id=state.sequence_id,
            token_ids=tuple(token_id for token_id, _, _ in samples),
            logprobs=tuple(logprob for _, logprob, _ in samples if logprob is not None),
            top_logprobs=tuple(top for _, _, top in samples if top),
            draft_token_ids=s.draft_token_ids if s.num_model_drafts else (),
        )


Sample = tuple[int, float | None, tuple[tuple[int, float], ...]]


def _accepted(samples: list[Sample], draft_token_ids: tuple[int, ...]) -> list[Sample]:
    """The target's samples at each position, kept while they equal the draft: lossless for greedy
    and, since a draft token is a point mass q, exactly rejection sampling (accept x with p(x), else
    sample p without x) for sampled requests. Always ends with one token the draft did not give."""
    for j, draft in enumerate(draft_token_ids):
        if samples[j][0] != draft:
            return samples[: j + 1]
    return samples
