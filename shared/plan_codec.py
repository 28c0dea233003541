"""Converts the plan contract between protobuf messages and `shared.step_plan` domain types.

Both services convert here, so the wire format and the domain types can only drift in one place.
"""

from __future__ import annotations

from shared.pb.pagewire.v1 import executor_pb2 as pb
from shared.step_plan import (
    AdapterLoad,
    BlockPairs,
    ContinuedSequence,
    NewSequence,
    SamplingOptions,
    SequenceId,
    SequenceOutput,
    StepError,
    StepPlan,
    StepResult,
    StepTiming,
)


def sampling_to_pb(options: SamplingOptions) -> pb.SamplingOptions:
    message = pb.SamplingOptions(
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        repetition_penalty=options.repetition_penalty,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        min_tokens=options.min_tokens,
        banned_token_ids_before_min_tokens=options.banned_token_ids_before_min_tokens,
    )
    if options.seed is not None:
        message.seed = options.seed
    if options.logprobs is not None:
        message.logprobs = options.logprobs
    return message


def sampling_from_pb(message: pb.SamplingOptions) -> SamplingOptions:
    return SamplingOptions(
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        min_p=message.min_p,
        repetition_penalty=message.repetition_penalty,
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        seed=message.seed if message.HasField("seed") else None,
        logprobs=message.logprobs if message.HasField("logprobs") else None,
        min_tokens=message.min_tokens,
        banned_token_ids_before_min_tokens=tuple(message.banned_token_ids_before_min_tokens),
    )


def _pairs_to_pb(pairs: BlockPairs) -> pb.BlockPairs:
    return pb.BlockPairs(src_block_ids=pairs.src_block_ids, dst_block_ids=pairs.dst_block_ids)


def _pairs_from_pb(message: pb.BlockPairs) -> BlockPairs:
    if len(message.src_block_ids) != len(message.dst_block_ids):
        raise ValueError(
            f"block pairs need as many src as dst ids, got {len(message.src_block_ids)} and "
            f"{len(message.dst_block_ids)}"
        )
    return BlockPairs(tuple(message.src_block_ids), tuple(message.dst_block_ids))


def plan_to_pb(plan: StepPlan) -> pb.StepPlan:
    message = pb.StepPlan(
        step_id=plan.step_id,
        finished_sequence_ids=plan.finished_sequence_ids,
        preempted_sequence_ids=plan.preempted_sequence_ids,
        swap_out=_pairs_to_pb(plan.swap_out),
        swap_in=_pairs_to_pb(plan.swap_in),
        copy=_pairs_to_pb(plan.copy),
    )
    for seq in plan.new_sequences:
        new = message.new_sequences.add(
            sequence_id=seq.sequence_id,
            token_ids=seq.token_ids,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_computed_tokens=seq.num_computed_tokens,
            block_ids=seq.block_ids,
            num_scheduled_tokens=seq.num_scheduled_tokens,
            sampling=sampling_to_pb(seq.sampling),
        )
        if seq.lora_slot is not None:
            new.lora_slot = seq.lora_slot
    for cont in plan.continued_sequences:
        message.continued_sequences.add(
            sequence_id=cont.sequence_id,
            num_scheduled_tokens=cont.num_scheduled_tokens,
            new_block_ids=cont.new_block_ids,
            draft_token_ids=cont.draft_token_ids,
            num_model_drafts=cont.num_model_drafts,
        )
    for load in plan.adapter_loads:
        message.adapter_loads.add(slot=load.slot, adapter_name=load.adapter_name, adapter_path=load.adapter_path)
    return message


def plan_from_pb(message: pb.StepPlan) -> StepPlan:
    """Raises ValueError when the message is structurally malformed."""
    return StepPlan(
        step_id=message.step_id,
        new_sequences=tuple(
            NewSequence(
                sequence_id=SequenceId(seq.sequence_id),
                token_ids=tuple(seq.token_ids),
                num_prompt_tokens=seq.num_prompt_tokens,
                num_computed_tokens=seq.num_computed_tokens,
                block_ids=tuple(seq.block_ids),
                num_scheduled_tokens=seq.num_scheduled_tokens,
                sampling=sampling_from_pb(seq.sampling),
                lora_slot=seq.lora_slot if seq.HasField("lora_slot") else None,
            )
            for seq in message.new_sequences
        ),
        continued_sequences=tuple(
            ContinuedSequence(
                sequence_id=SequenceId(cont.sequence_id),
                num_scheduled_tokens=cont.num_scheduled_tokens,
                new_block_ids=tuple(cont.new_block_ids),
                draft_token_ids=tuple(cont.draft_token_ids),
                num_model_drafts=cont.num_model_drafts,
            )
            for cont in message.continued_sequences
        ),
        finished_sequence_ids=tuple(message.finished_sequence_ids),
        preempted_sequence_ids=tuple(message.preempted_sequence_ids),
        swap_out=_pairs_from_pb(message.swap_out),
        swap_in=_pairs_from_pb(message.swap_in),
        copy=_pairs_from_pb(message.copy),
        adapter_loads=tuple(
            AdapterLoad(slot=a.slot, adapter_name=a.adapter_name, adapter_path=a.adapter_path)
            for a in message.adapter_loads
        ),
    )


def result_to_pb(result: StepResult) -> pb.StepResult:
    message = pb.StepResult(
        step_id=result.step_id,
        timing=pb.StepTiming(
            total_seconds=result.timing.total_seconds,
            forward_seconds=result.timing.forward_seconds,
            sample_seconds=result.timing.sample_seconds,
            block_ops_seconds=result.timing.block_ops_seconds,
            num_tokens=result.timing.num_tokens,
            draft_seconds=result.timing.draft_seconds,
        ),
    )
    if result.error is not None:
        message.error.code = result.error.code
        message.error.message = result.error.message
        if result.error.adapter_slot is not None:
            message.error.adapter_slot = result.error.adapter_slot
    for out in result.outputs:
        entry = message.outputs.add(
            sequence_id=out.sequence_id, token_ids=out.token_ids, logprobs=out.logprobs,
            draft_token_ids=out.draft_token_ids,
        )
        for candidates in out.top_logprobs:
            entry.top_logprobs.add(
                token_ids=[token_id for token_id, _ in candidates],
                logprobs=[logprob for _, logprob in candidates],
            )
    return message


def result_from_pb(message: pb.StepResult) -> StepResult:
    error = None
    if message.HasField("error"):
        error = StepError(
            code=message.error.code, message=message.error.message,
            adapter_slot=message.error.adapter_slot if message.error.HasField("adapter_slot") else None,
        )
    return StepResult(
        step_id=message.step_id,
        outputs=tuple(
            SequenceOutput(
                sequence_id=SequenceId(out.sequence_id),
                token_ids=tuple(out.token_ids),
                logprobs=tuple(out.logprobs),
                top_logprobs=tuple(
                    tuple(zip(top.token_ids, top.logprobs)) for top in out.top_logprobs
                ),
                draft_token_ids=tuple(out.draft_token_ids),
            )
            for out in message.outputs
        ),
        timing=StepTiming(
            total_seconds=message.timing.total_seconds,
            forward_seconds=message.timing.forward_seconds,
            sample_seconds=message.timing.sample_seconds,
            block_ops_seconds=message.timing.block_ops_seconds,
            num_tokens=message.timing.num_tokens,
            draft_seconds=message.timing.draft_seconds,
        ),
        error=error,
    )
