"""What a verified draft does to its sequence in the scheduler."""

from __future__ import annotations

from scheduler_service.scheduler_counters import SchedulerCounters
from scheduler_service.sequence import Sequence
from scheduler_service.speculative.speculation_policy import SpeculationPolicy
from shared.step_plan import SequenceOutput


def accept_drafts(
    seq: Sequence, output: SequenceOutput, policy: SpeculationPolicy, counters: SchedulerCounters
) -> None:
    """The executor kept the drafts up to the first its own sample disagreed with, then that sample:
    computed positions roll back to the accepted ones (the rest are overwritten next step); the
    sequence's acceptance rate and the counters learn how far the draft got. The drafts are the
    scheduler's own, or the executor's draft model's (`output.draft_token_ids`, as many as asked)."""
    token_ids = output.token_ids
    if seq.num_model_drafts:
        assert len(output.draft_token_ids) == seq.num_model_drafts, (
            f"sequence {seq.sequence_id}: {len(output.draft_token_ids)} model drafts, asked for {seq.num_model_drafts}"
        )
        drafts = tuple(output.draft_token_ids)
    else:
        drafts = seq.draft_token_ids
    seq.drop_drafts()
    num_accepted = len(token_ids) - 1
    assert 0 <= num_accepted <= len(drafts) and tuple(token_ids[:num_accepted]) == drafts[:num_accepted], (
        f"sequence {seq.sequence_id}: tokens {token_ids} do not continue drafts {drafts}"
    )
    seq.num_computed_tokens -= len(drafts) - num_accepted
    seq.draft_acceptance = policy.learned(seq.draft_acceptance, len(drafts), num_accepted)
    counters.count_draft(len(drafts), num_accepted)
