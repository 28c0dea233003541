"""The adaptive part of speculative decoding: the step-time fit (decode steps only), the break-even bar
it gives, the draft length per request, and a request's per-token acceptance learned from its drafts
and recovering while it is not drafted."""

from __future__ import annotations

import dataclasses
import random

import pytest

from scheduler_service.in_flight_plans import PlanInFlight
from scheduler_service.scheduler import Scheduler
from scheduler_service.sequence import Sequence
from scheduler_service.speculative.draft_cost import DraftCost
from scheduler_service.speculative.draft_proposer import ExecutorDraftModel
from scheduler_service.speculative.speculation_policy import PRIOR_ACCEPTANCE, SpeculationPolicy, StepTimeModel
from shared.step_plan import ContinuedSequence, NewSequence, SequenceId, StepPlan, StepResult, StepTiming
from tests.helpers.executor_mirror import ExecutorMirror, make_scheduler, own_prompt


def fitted(fixed: float, per_token: float, sizes: list[int]) -> StepTimeModel:
    model = StepTimeModel()
    for n in sizes:
        model.observe(n, fixed + per_token * n)
    return model


def decode_plan(step_id: int, num_decodes: int, num_drafts: int = 0) -> StepPlan:
    """`num_decodes` sequences decoding, the first one verifying `num_drafts` draft tokens."""
    drafted = ContinuedSequence(SequenceId(0), 1 + num_drafts, (), (7,) * num_drafts)
    others = tuple(ContinuedSequence(SequenceId(i), 1) for i in range(1, num_decodes))
    return StepPlan(step_id=step_id, continued_sequences=(drafted, *others))


def prefill_plan(step_id: int, num_tokens: int, num_sequences: int) -> StepPlan:
    """`num_sequences` prompts of `num_tokens` tokens in all, each computed to its end (and sampled)."""
    sizes = [num_tokens // num_sequences + (i < num_tokens % num_sequences) for i in range(num_sequences)]
    return StepPlan(step_id=step_id, new_sequences=tuple(
        NewSequence(SequenceId(100 + i), (1,) * n, n, 0, (), n) for i, n in enumerate(sizes)
    ))


def observed(policy: SpeculationPolicy, plan: StepPlan, num_sampling: int, seconds: float) -> None:
    timing = StepTiming(forward_seconds=seconds, num_tokens=plan.num_scheduled_tokens)
    policy.observe_step(PlanInFlight(plan, {}, num_sampling), StepResult(plan.step_id, timing=timing))


def timed(
    result: StepResult, plan: StepPlan, forward_seconds: float, draft_seconds: float = 0.0
) -> StepResult:
    """The mirror's result with the executor's timing of `plan`."""
    timing = StepTiming(
        forward_seconds=forward_seconds, num_tokens=plan.num_scheduled_tokens, draft_seconds=draft_seconds
    )
    return dataclasses.replace(result, timing=timing)


def policy_with(fixed: float, per_token: float, num_decodes: int) -> SpeculationPolicy:
    """A policy that saw decode steps of 1..2 * num_decodes tokens, the last of `num_decodes`, no drafts."""
    policy = SpeculationPolicy()
    for step_id, n in enumerate([*range(1, 2 * num_decodes + 1), num_decodes]):
        observed(policy, decode_plan(step_id, n), n, fixed + per_token * n)
    return policy


def test_the_fit_recovers_fixed_and_per_token_cost() -> None:
    model = fitted(0.010, 0.0005, [1, 8, 64, 3, 200, 17] * 5)
    assert model.fixed == pytest.approx(0.010, rel=1e-6)
    assert model.per_token == pytest.approx(0.0005, rel=1e-6)
    assert model.token_share(20) == pytest.approx(0.010 / 0.020)


def test_one_step_size_alone_says_nothing_about_per_token_cost() -> None:
    model = fitted(0.01, 0.001, [16] * 10)
    assert model.per_token == 0.0 and model.token_share(16) == 0.0


def test_a_steady_batch_keeps_the_slope_its_varied_steps_gave() -> None:
    model = fitted(0.010, 0.0005, [1, 8, 64, 3, 200, 17] * 5)
    for _ in range(2000):  # the sizes stop varying: nothing new about the slope, which must not decay
        model.observe(64, 0.010 + 0.0005 * 64)
    assert model.per_token == pytest.approx(0.0005, rel=1e-6)
    assert model.fixed == pytest.approx(0.010, rel=1e-6)
    model.observe(63, 0.010 + 0.0005 * 64 + 0.005)  # one token fewer, slower: noise, not a negative cost
    assert model.per_token == pytest.approx(0.0005, rel=1e-6)


# Measured on the 2-core development machine (SmolLM2-135M, chat workload at batch 64): a 2048-token
# prefill step took 6.34 s (3.1 ms per token), decode steps ~54 ms + 5.4 ms per token.
PREFILL_TOKENS, PREFILL_SECONDS = 2048, 6.34
DECODE_FIXED, DECODE_PER_TOKEN = 0.054, 0.0054


def test_prefill_steps_stay_out_of_the_fit_so_a_compute_bound_batch_of_64_stops_drafting() -> None:
    plans = [prefill_plan(0, PREFILL_TOKENS, 55), prefill_plan(1, 386, 9)]
    plans += [decode_plan(2 + i, 64, d) for i, d in enumerate((0, 0, 80, 24, 16, 32, 0, 0))]
    policy = SpeculationPolicy()
    mixed = StepTimeModel()  # the rule before: every step in one fit
    for plan in plans:
        num_tokens = plan.num_scheduled_tokens
        seconds = DECODE_FIXED + DECODE_PER_TOKEN * num_tokens
        if plan.new_sequences:
            seconds = PREFILL_SECONDS * num_tokens / PREFILL_TOKENS
        observed(policy, plan, len(plan.new_sequences) or 64, seconds)
        mixed.observe(num_tokens, seconds)
    assert policy.step_time.per_token == pytest.approx(DECODE_PER_TOKEN, rel=1e-9)
    assert policy.step_time.fixed == pytest.approx(DECODE_FIXED, rel=1e-6)
    assert policy.last_num_decodes == 64
    bar = 64 * DECODE_PER_TOKEN / (DECODE_FIXED + 64 * DECODE_PER_TOKEN)  # 0.865
    assert policy.draft_length(bar + 0.01, 4) == 1 and policy.draft_length(bar - 0.01, 4) == 0
    # New requests start at the prior: the chat workload (about 35% of its drafts accepted) is not drafted.
    assert not policy.worth_drafting(PRIOR_ACCEPTANCE)
    # The mixed fit prices a token like a prefill token and its bar lets the prior through.
    assert mixed.per_token < 0.0035 and mixed.token_share(64) < PRIOR_ACCEPTANCE


@pytest.mark.parametrize(
    ("acceptance", "expected_length"),
    [(0.95, 4), (0.75, 2), (0.51, 1), (0.49, 0), (0.0, 0)],
)
def test_a_request_gets_the_draft_tokens_whose_chance_of_being_reached_pays(
    acceptance: float, expected_length: int
) -> None:
    policy = policy_with(fixed=0.010, per_token=0.001, num_decodes=10)  # bar = 10 ms / 20 ms = 0.5
    assert policy.draft_length(acceptance, 4) == expected_length
    assert policy.worth_drafting(acceptance) == (expected_length > 0)


def test_the_bar_follows_the_number_of_sequences_running() -> None:
    policy = policy_with(fixed=0.010, per_token=0.001, num_decodes=10)
    assert policy.worth_drafting(0.4, num_decodes=1)  # bar 1 / 11: a tail of few requests drafts
    assert not policy.worth_drafting(0.4, num_decodes=10) and not policy.worth_drafting(0.4)  # bar 0.5
    assert policy.draft_length(0.4, 4, num_decodes=1) == 2  # 0.4^2 = 0.16 >= 0.091 > 0.4^3


def test_an_idle_memory_bound_executor_drafts_nearly_everything_and_adaptive_off_drafts_all() -> None:
    policy = policy_with(fixed=0.020, per_token=0.00001, num_decodes=2)  # bar 0.001
    assert policy.draft_length(0.2, 4) == 4
    policy.adaptive = False
    assert policy.draft_length(0.0, 3) == 3 and policy.draft_length(0.9, 0) == 0


def test_acceptance_is_learned_per_token_and_recovers_toward_the_prior() -> None:
    assert SpeculationPolicy.learned(1.0, num_drafted=4, num_accepted=0) == pytest.approx(0.8)
    # 2 accepted of 3 tried (the 4th draft was never reached): toward 2/3 with weight 1 - 0.8^3.
    assert SpeculationPolicy.learned(0.5, num_drafted=4, num_accepted=2) == pytest.approx(0.5 + (2 / 3 - 0.5) * 0.488)
    assert SpeculationPolicy.learned(0.5, num_drafted=4, num_accepted=4) == pytest.approx(0.5 + 0.5 * (1 - 0.8**4))
    rate = 0.0
    for _ in range(200):
        rate = SpeculationPolicy.recovered(rate)
    assert rate == pytest.approx(PRIOR_ACCEPTANCE, abs=1e-3)


def test_the_learned_rate_estimates_the_per_token_acceptance_of_long_drafts() -> None:
    """Each draft token accepted with p = 0.5, drafts of 4: the learned rate hovers near 0.5 (0.46 in
    expectation with this learning rate), where accepted / drafted per verification would say
    (0.5 + 0.25 + 0.125 + 0.0625) / 4 = 0.23."""
    rng = random.Random(0)
    rate, rates = PRIOR_ACCEPTANCE, []
    for _ in range(4000):
        num_accepted = next((j for j in range(4) if rng.random() >= 0.5), 4)
        rate = SpeculationPolicy.learned(rate, 4, num_accepted)
        rates.append(rate)
    assert sum(rates[100:]) / len(rates[100:]) == pytest.approx(0.5, abs=0.06)


class RightProposer:
    num_speculative_tokens = 3

    def propose(self, token_ids, k):  # noqa: ANN001, ANN201
        return (7,) * k


def test_a_compute_bound_step_drafts_few_tokens_and_only_for_requests_that_are_nearly_always_right() -> None:
    scheduler: Scheduler = make_scheduler(max_model_len=32)
    scheduler.proposer = RightProposer()
    # With the 3 sequences running: bar = 3 ms / 3.3 ms = 0.909.
    scheduler.speculation = policy_with(fixed=0.0003, per_token=0.001, num_decodes=8)
    good = Sequence(SequenceId(1), own_prompt(1, 3), arrival_index=1, draft_acceptance=0.99)
    fair = Sequence(SequenceId(2), own_prompt(2, 3), arrival_index=2, draft_acceptance=0.92)
    poor = Sequence(SequenceId(3), own_prompt(3, 3), arrival_index=3, draft_acceptance=0.5)
    for seq in (good, fair, poor):
        scheduler.add_sequence(seq)
    mirror = ExecutorMirror(4, 16)
    scheduler.apply_result(mirror.step(scheduler.schedule()))  # prefill
    plan = scheduler.schedule()
    drafted = {c.sequence_id: c.draft_token_ids for c in plan.continued_sequences}
    assert drafted == {1: (7, 7, 7), 2: (7,), 3: ()}  # 0.99^3 = 0.97; 0.92^2 = 0.85 < 0.909 < 0.92
    assert poor.draft_acceptance > 0.5 and fair.draft_acceptance == 0.92  # not drafted: recovering


def test_the_scheduler_feeds_the_fit_its_decode_steps_only() -> None:
    scheduler: Scheduler = make_scheduler(max_model_len=32)
    scheduler.proposer = RightProposer()
    scheduler.add_sequence(Sequence(SequenceId(1), own_prompt(1, 5), arrival_index=1))
    scheduler.add_sequence(Sequence(SequenceId(2), own_prompt(2, 3), arrival_index=2))
    mirror = ExecutorMirror(4, 16)
    policy = scheduler.speculation
    plan = scheduler.schedule()
    scheduler.apply_result(timed(mirror.step(plan), plan, 0.5))
    assert policy.step_time.last_num_tokens == 0  # a prefill step: not observed
    plan = scheduler.schedule()  # both decode, each drafted 3 (no fit yet: drafting is free)
    assert plan.num_scheduled_tokens == 2 * (1 + 3)
    scheduler.apply_result(timed(mirror.step(plan), plan, 0.1))
    assert (policy.step_time.last_num_tokens, policy.last_num_decodes) == (8, 2)
    assert policy.step_time.fixed == pytest.approx(0.1)  # one size seen: no slope yet


def test_the_draft_models_cost_is_learned_per_draft_token_it_proposed() -> None:
    scheduler: Scheduler = make_scheduler(max_model_len=32)
    scheduler.proposer = ExecutorDraftModel(4)
    scheduler.add_sequence(Sequence(SequenceId(1), own_prompt(1, 5), arrival_index=1))
    mirror = ExecutorMirror(4, 16)
    plan = scheduler.schedule()
    scheduler.apply_result(timed(mirror.step(plan), plan, 0.5))
    plan = scheduler.schedule()
    assert plan.continued_sequences[0].num_model_drafts == 4
    scheduler.apply_result(timed(mirror.step(plan), plan, 0.1, draft_seconds=0.02))
    assert scheduler.speculation.draft_cost.seconds_per_draft_token == pytest.approx(0.005)


def test_with_speculation_off_the_policy_learns_nothing() -> None:
    scheduler: Scheduler = make_scheduler(max_model_len=32)
    scheduler.add_sequence(Sequence(SequenceId(1), own_prompt(1, 5), arrival_index=1))
    mirror = ExecutorMirror(4, 16)
    for seconds in (0.5, 0.1, 0.2):
        plan = scheduler.schedule()
        scheduler.apply_result(timed(mirror.step(plan), plan, seconds, draft_seconds=seconds))
    policy = scheduler.speculation
    assert (policy.step_time, policy.draft_cost, policy.last_num_decodes) == (StepTimeModel(), DraftCost(), 0)
