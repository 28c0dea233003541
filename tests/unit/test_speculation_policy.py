"""The adaptive part of speculative decoding: the step-time fit, the break-even acceptance rate it
gives, and a request's acceptance learned from its drafts and recovering while it is not drafted."""

from __future__ import annotations

import pytest

from scheduler_service.scheduler import Scheduler
from scheduler_service.sequence import Sequence
from scheduler_service.speculative.speculation_policy import PRIOR_ACCEPTANCE, SpeculationPolicy, StepTimeModel
from shared.step_plan import SequenceId
from tests.helpers.executor_mirror import ExecutorMirror, make_scheduler, own_prompt


def fitted(fixed: float, per_token: float, sizes: list[int]) -> StepTimeModel:
    model = StepTimeModel()
    for n in sizes:
        model.observe(n, fixed + per_token * n)
    return model


def test_the_fit_recovers_fixed_and_per_token_cost() -> None:
    model = fitted(0.010, 0.0005, [1, 8, 64, 3, 200, 17] * 5)
    assert model.fixed == pytest.approx(0.010, rel=1e-6)
    assert model.per_token == pytest.approx(0.0005, rel=1e-6)
    assert model.token_share(20) == pytest.approx(0.010 / 0.020)


def test_one_step_size_alone_says_nothing_about_per_token_cost() -> None:
    model = fitted(0.01, 0.001, [16] * 10)
    assert model.per_token == 0.0 and model.token_share(16) == 0.0


def test_drafting_pays_at_low_load_and_needs_high_acceptance_when_compute_bound() -> None:
    policy = SpeculationPolicy()
    policy.step_time = fitted(0.020, 0.0001, [1, 2, 4, 8, 300, 400, 500])  # memory-bound: a dominates
    policy.step_time.observe(4, 0.020 + 0.0001 * 4)
    assert policy.worth_drafting(0.05)
    policy.step_time = fitted(0.001, 0.001, [1, 2, 4, 8, 300, 400, 500])  # compute-bound at 500 tokens
    policy.step_time.observe(500, 0.001 + 0.001 * 500)
    assert not policy.worth_drafting(0.9) and policy.worth_drafting(0.999)


def test_acceptance_is_learned_and_recovers_toward_the_prior() -> None:
    rate = SpeculationPolicy.learned(1.0, num_drafted=4, num_accepted=0)
    assert rate == pytest.approx(0.7)
    for _ in range(200):
        rate = SpeculationPolicy.recovered(rate)
    assert rate == pytest.approx(PRIOR_ACCEPTANCE, abs=1e-3)


class RightProposer:
    num_speculative_tokens = 3

    def propose(self, token_ids, k):  # noqa: ANN001, ANN201
        return (7,) * k


def test_a_compute_bound_step_drafts_only_requests_whose_drafts_are_nearly_always_accepted() -> None:
    scheduler: Scheduler = make_scheduler(max_model_len=32)
    scheduler.proposer = RightProposer()
    scheduler.speculation.step_time = fitted(0.001, 0.001, [1, 4, 16, 32])
    scheduler.speculation.step_time.observe(32, 0.033)  # token share 32/33
    good = Sequence(SequenceId(1), own_prompt(1, 3), arrival_index=1, draft_acceptance=0.99)
    poor = Sequence(SequenceId(2), own_prompt(2, 3), arrival_index=2, draft_acceptance=0.5)
    scheduler.add_sequence(good)
    scheduler.add_sequence(poor)
    mirror = ExecutorMirror(4, 16)
    scheduler.apply_result(mirror.step(scheduler.schedule()))  # prefill
    plan = scheduler.schedule()
    drafted = {c.sequence_id: c.draft_token_ids for c in plan.continued_sequences}
    assert drafted == {1: (7, 7, 7), 2: ()}
    assert poor.draft_acceptance > 0.5  # not drafted: recovering
