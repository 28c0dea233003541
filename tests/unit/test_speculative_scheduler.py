"""Speculative decoding in the scheduler against a verifying mirror of the executor: drafts only ever
change how many steps a sequence takes, never its tokens; KV slots, prefix cache, preemption and the
sequence's end are respected; the counters say what was accepted."""

from __future__ import annotations

import random
from collections.abc import Sequence as SequenceOf

import pytest

from scheduler_service.scheduler import Scheduler
from scheduler_service.sequence import Sequence
from scheduler_service.speculative.draft_proposer import ExecutorDraftModel, proposer_from
from scheduler_service.speculative.ngram_proposer import NgramProposer
from shared.speculative_config import SpeculativeConfig
from shared.step_plan import SequenceId
from tests.helpers.executor_mirror import ExecutorMirror, make_scheduler, own_prompt, sampled_token


class OracleProposer:
    """Proposes the mirror's own next samples for the first `num_right` positions, then wrong ones."""

    def __init__(self, num_speculative_tokens: int, num_right: int) -> None:
        self.num_speculative_tokens = num_speculative_tokens
        self.num_right = num_right
        self.sequence_of: dict[tuple[int, ...], int] = {}

    def propose(self, token_ids: SequenceOf[int], k: int) -> tuple[int, ...]:
        sequence_id = token_ids[0] // 100  # own_prompt(sequence_id, ...) starts at 100 * sequence_id
        known = len(token_ids)
        return tuple(
            sampled_token(sequence_id, known + j) if j < self.num_right else 7 for j in range(k)
        )


def with_proposer(proposer: object | None, **settings: int) -> Scheduler:
    scheduler = make_scheduler(**settings)
    scheduler.proposer = proposer
    return scheduler


def run(scheduler: Scheduler, mirror: ExecutorMirror, lengths: dict[int, tuple[int, int]],
        rng: random.Random | None = None) -> tuple[dict[int, list[int]], int]:
    """Runs sequences {id: (prompt tokens, max new tokens)} to their end, one plan at a time; returns
    their outputs and the number of steps."""
    for sequence_id, (num_prompt, max_new) in lengths.items():
        scheduler.add_sequence(Sequence(SequenceId(sequence_id), own_prompt(sequence_id, num_prompt),
                                        arrival_index=sequence_id, max_num_tokens=num_prompt + max_new))
    outputs: dict[int, list[int]] = {}
    num_steps = 0
    while scheduler.has_work:
        plan = scheduler.schedule()
        assert plan is not None
        scheduler.check_integrity()
        scheduler.apply_result(mirror.step(plan))
        scheduler.check_integrity()
        num_steps += 1
        for seq in list(scheduler.running):
            num_prompt, max_new = lengths[seq.sequence_id]
            if seq.num_output_tokens >= max_new:
                assert seq.num_output_tokens == max_new, "a speculative step ran past max_tokens"
                outputs[seq.sequence_id] = list(seq.output_token_ids)
                scheduler.finish_sequence(seq.sequence_id)
        assert num_steps < 2000
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.block_pool.num_blocks
    return outputs, num_steps


LENGTHS = {1: (5, 12), 2: (9, 7), 3: (3, 15)}
EXPECTED = {sid: [sampled_token(sid, num_prompt + i) for i in range(new)] for sid, (num_prompt, new) in LENGTHS.items()}


def test_right_drafts_are_all_accepted_and_save_steps() -> None:
    base_outputs, base_steps = run(make_scheduler(max_model_len=32), ExecutorMirror(4, 16), LENGTHS)
    scheduler = with_proposer(OracleProposer(3, num_right=3), max_model_len=32)
    outputs, steps = run(scheduler, ExecutorMirror(4, 16), LENGTHS)
    assert outputs == base_outputs == EXPECTED
    assert steps < base_steps / 2
    counters = scheduler.counters
    assert counters.num_accepted_draft_tokens == counters.num_draft_tokens > 0
    assert counters.num_accepted_per_position[0] == counters.num_drafts


@pytest.mark.parametrize("num_right", [0, 1, 2])
def test_wrong_drafts_are_rejected_at_their_position_and_change_nothing(num_right: int) -> None:
    scheduler = with_proposer(OracleProposer(3, num_right=num_right), max_model_len=32)
    outputs, _ = run(scheduler, ExecutorMirror(4, 16), LENGTHS)
    assert outputs == EXPECTED
    counters = scheduler.counters
    assert counters.num_drafts > 0
    # Every draft is accepted up to num_right (fewer only when k was capped by the sequence's end).
    assert counters.num_accepted_draft_tokens <= num_right * counters.num_drafts
    assert counters.num_accepted_per_position[num_right:] == [0] * (3 - num_right)


def test_drafts_never_pass_the_sequences_end() -> None:
    scheduler = with_proposer(OracleProposer(8, num_right=8), max_model_len=24, max_num_batched_tokens=16)
    outputs, _ = run(scheduler, ExecutorMirror(4, 16), {1: (5, 6), 2: (20, 4)})
    assert outputs == {1: [sampled_token(1, 5 + i) for i in range(6)], 2: [sampled_token(2, 20 + i) for i in range(4)]}


def test_speculation_under_preemption_and_prefix_sharing_keeps_every_token() -> None:
    rng = random.Random(3)
    lengths = {sid: (rng.randint(1, 14), rng.randint(1, 12)) for sid in range(1, 13)}
    expected = {sid: [sampled_token(sid, p + i) for i in range(n)] for sid, (p, n) in lengths.items()}
    for mode, num_host_blocks in (("recompute", 0), ("swap", 12)):
        scheduler = with_proposer(OracleProposer(4, num_right=2), num_blocks=14, max_num_seqs=6,
                                  max_num_batched_tokens=24, max_model_len=28, num_host_blocks=num_host_blocks,
                                  preemption_mode=mode)
        outputs, _ = run(scheduler, ExecutorMirror(4, 14, num_host_blocks), lengths)
        assert outputs == expected, mode
        assert scheduler.num_preemptions > 0, mode


@pytest.mark.parametrize("num_right", [0, 2, 4])
def test_model_drafts_under_preemption_keep_every_token_and_count_what_the_executor_proposed(
    num_right: int,
) -> None:
    rng = random.Random(5)
    lengths = {sid: (rng.randint(1, 14), rng.randint(1, 12)) for sid in range(1, 13)}
    expected = {sid: [sampled_token(sid, p + i) for i in range(n)] for sid, (p, n) in lengths.items()}
    for mode, num_host_blocks in (("recompute", 0), ("swap", 12)):
        scheduler = with_proposer(ExecutorDraftModel(4), num_blocks=14, max_num_seqs=6, max_num_batched_tokens=24,
                                  max_model_len=28, num_host_blocks=num_host_blocks, preemption_mode=mode)
        mirror = ExecutorMirror(4, 14, num_host_blocks, num_right_model_drafts=num_right)
        outputs, _ = run(scheduler, mirror, lengths)
        assert outputs == expected, mode
        assert scheduler.num_preemptions > 0, mode
        counters = scheduler.counters
        assert counters.num_drafts > 0 and counters.num_accepted_draft_tokens <= num_right * counters.num_drafts
        if num_right == 4:  # right drafts, k capped only by the sequence's end
            assert counters.num_accepted_draft_tokens == counters.num_draft_tokens
        assert counters.num_accepted_per_position[num_right:] == [0] * (4 - num_right)


def test_a_scheduler_needs_an_executor_draft_model_for_model_drafts() -> None:
    config = SpeculativeConfig.parse('{"method": "draft_model", "model": "d", "num_speculative_tokens": 4}')
    assert isinstance(proposer_from(config, max_model_drafts=4), ExecutorDraftModel)
    with pytest.raises(ValueError, match="has no draft model"):
        proposer_from(config, max_model_drafts=0)
    with pytest.raises(ValueError, match="at most 2 drafts"):
        proposer_from(config, max_model_drafts=2)


def test_a_request_that_opts_out_is_never_speculated() -> None:
    scheduler = with_proposer(OracleProposer(3, num_right=3), max_model_len=32)
    scheduler.add_sequence(Sequence(SequenceId(1), own_prompt(1, 4), arrival_index=1, max_num_tokens=12,
                                    speculative=False))
    mirror = ExecutorMirror(4, 16)
    for _ in range(6):
        plan = scheduler.schedule()
        assert plan is not None and all(not c.draft_token_ids for c in plan.continued_sequences)
        scheduler.apply_result(mirror.step(plan))
    assert scheduler.counters.num_drafts == 0


def test_ngram_proposer_copies_what_followed_the_latest_match() -> None:
    proposer = NgramProposer(min_n=2, max_n=4, num_speculative_tokens=3)
    assert proposer.propose((1, 2, 3, 4, 5, 1, 2, 3), 3) == (4, 5, 1)
    assert proposer.propose((1, 2, 9, 8, 1, 2, 7, 6, 1, 2), 2) == (7, 6)  # the latest occurrence wins
    assert proposer.propose((4, 1, 2, 3, 9, 9, 1, 2, 3), 4) == (9, 9, 1, 2)  # the longest n first
    assert proposer.propose((1, 2, 3), 2) == ()
    assert proposer.propose((5, 6, 5, 6), 0) == ()
    assert NgramProposer(1, 1, 2).propose((3, 8, 3), 2) == (8, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "is not JSON"),
        ("[1]", "must be a JSON object"),
        ('{"method": "draft_model", "num_speculative_tokens": 2}', "draft_model needs \"model\""),
        ('{"method": "draft_model", "model": "d", "num_speculative_tokens": 2, "prompt_lookup_max": 3}',
         "unknown keys"),
        ('{"method": "eagle", "num_speculative_tokens": 2}', "method must be ngram"),
        ('{"method": "ngram"}', "needs num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "in 1..16"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5}', "prompt_lookup_min <= prompt_lookup_max"),
        ('{"method": "ngram", "num_speculative_tokens": 2, "typo": 1}', "unknown keys"),
    ],
)
def test_bad_speculative_configs_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.parse(text)


def test_the_default_lookup_lengths() -> None:
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4}')
    assert (config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == (4, 2, 4)
