"""When drafting pays: a step-time model fitted online from the executor's decode-step forward times,
weighed against how often each request's draft tokens are accepted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from scheduler_service.in_flight_plans import PlanInFlight
from scheduler_service.speculative.draft_cost import DraftCost
from shared.step_plan import StepResult

if TYPE_CHECKING:  # sequence.py imports PRIOR_ACCEPTANCE from here
    from collections.abc import Collection

    from scheduler_service.sequence import Sequence

# Each step's observation weighs this much against everything before it (exponential forgetting).
_FORGET = 0.05
# A request's per-token acceptance rate learns this much from each draft token a verification tried.
_LEARN = 0.2
# While a request is not drafted, its rate creeps back to the prior by this fraction per decode, so a
# request whose drafts kept failing is tried again now and then.
_RECOVER = 0.05
PRIOR_ACCEPTANCE = 0.7
# While the recent step sizes vary by less than this fraction of their mean (weighted standard
# deviation), a slope fitted from them would be noise: the last one fitted is kept.
_MIN_RELATIVE_SIZE_SPREAD = 0.1


@dataclass(slots=True)
class StepTimeModel:
    """forward seconds ~= fixed + per_token * tokens, by weighted least squares with forgetting.

    `fixed` is what a step costs whatever its size (reading the weights, launching work); `per_token`
    what each computed token adds. Until sizes that differ were seen, `per_token` is unknown (0); while
    the recent sizes hardly vary (a steady batch), or the fit says a token costs nothing or less, the
    last positive slope fitted from varied sizes is kept. Fed only decode steps
    (SpeculationPolicy.observe_step), whose every token gets logits and is sampled, as a draft token is."""

    _weight: float = 0.0
    _mean_x: float = 0.0
    _mean_y: float = 0.0
    # Weighted co-moments about the means (centred, so a steady size does not cancel catastrophically).
    _cxx: float = 0.0
    _cxy: float = 0.0
    _slope: float = 0.0
    last_num_tokens: int = 0

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        keep = 1.0 - _FORGET
        self._weight = self._weight * keep + 1.0
        dx, dy = num_tokens - self._mean_x, seconds - self._mean_y
        self._mean_x += dx / self._weight
        self._mean_y += dy / self._weight
        self._cxx = self._cxx * keep + dx * (num_tokens - self._mean_x)
        self._cxy = self._cxy * keep + dx * (seconds - self._mean_y)
        spread = _MIN_RELATIVE_SIZE_SPREAD * max(self._mean_x, 1.0)
        if self._cxx >= spread * spread * self._weight and self._cxy > 0:
            self._slope = self._cxy / self._cxx
        self.last_num_tokens = num_tokens

    @property
    def per_token(self) -> float:
        return max(0.0, self._slope)

    @property
    def fixed(self) -> float:
        return max(0.0, self._mean_y - self.per_token * self._mean_x)

    def token_share(self, num_tokens: int) -> float:
        """Of a step of `num_tokens` tokens, the share of its time its tokens cost (0: all fixed)."""
        per_token, fixed = self.per_token, self.fixed
        total = fixed + per_token * num_tokens
        return per_token * num_tokens / total if total > 0 else 0.0


class SpeculationPolicy:
    """Drafting one more token for a request adds a token to the step (everyone waits `per_token` more)
    and gains it when it and every draft token before it are accepted. With B sequences decoding, fixed
    cost a and per-token cost b, a step makes B tokens in a + B b seconds, so the j-th draft token of a
    request whose tokens are each accepted with probability p raises throughput when p^j >= B b /
    (a + B b), the token share of a step without drafts: near 0 on an idle, memory-bound executor
    (draft freely), near 1 when the forward is compute-bound (only requests whose drafts are nearly
    always right, and few tokens of them). B is the number of sequences running (the scheduler's
    count; by default the last decode step's). A draft model adds its own time per draft token c
    (`draft_cost`), so the bar rises by B c / (a + B b): a draft as slow as the target never pays.

    a and b are fitted on decode steps only: a prefill token gets no logits (no LM head, no sampling)
    and runs in large efficient matrix products, so mixing prefill steps into the fit under-states what
    a draft token costs (measured on 2 CPU cores, SmolLM2-135M: 3.0-3.3 ms per prefill token, 5.0-5.4
    ms per decode token), which kept drafting at batch 64 where it cost throughput. With `adaptive` off
    (a benchmark or test that measures drafting itself), every request that allows it is drafted every
    step, as far as asked."""

    def __init__(self) -> None:
        self.step_time = StepTimeModel()
        self.draft_cost = DraftCost()
        self.adaptive = True
        self.last_num_decodes = 0

    def observe_step(self, sent: PlanInFlight, result: StepResult) -> None:
        """Learns from the timing of a step that speculation may draft in: the fit from its forward time
        when it is a decode step (every token it computes gets logits: a sampling sequence's last token
        and its drafts, no prompt or recomputed token), the draft model's cost from its draft time."""
        plan, timing = sent.plan, result.timing
        num_drafts = sum(len(c.draft_token_ids) + c.num_model_drafts for c in plan.continued_sequences)
        num_unsampled = plan.num_scheduled_tokens - sent.num_sampling_sequences - num_drafts
        if num_unsampled <= 0 and timing.num_tokens > num_drafts:
            self.step_time.observe(timing.num_tokens, timing.forward_seconds)
            self.last_num_decodes = timing.num_tokens - num_drafts
        self.draft_cost.observe(sum(len(o.draft_token_ids) for o in result.outputs), timing.draft_seconds)

    def draft_length(self, acceptance: float, max_num_tokens: int, num_decodes: int | None = None) -> int:
        """How many draft tokens, up to `max_num_tokens`, a request accepting each with probability
        `acceptance` should get in a step of `num_decodes` sequences: the longest run whose last token
        still pays (0: do not draft)."""
        if not self.adaptive:
            return max(0, max_num_tokens)
        bar = self._bar(self.last_num_decodes if num_decodes is None else num_decodes)
        num_tokens, reach = 0, acceptance
        while num_tokens < max_num_tokens and reach >= bar and reach > 0:
            num_tokens += 1
            reach *= acceptance
        return num_tokens

    def worth_drafting(self, acceptance: float, num_decodes: int | None = None) -> bool:
        return self.draft_length(acceptance, 1, num_decodes) == 1

    def drafts_next_step(
        self, running: Collection[Sequence], max_num_draft_tokens: int, max_model_len: int
    ) -> bool:
        """Whether the scheduler's first step after the plans in flight drafts for one of the `running`
        sequences: one that allows drafting, whose next step is a decode (the only steps that draft)
        and whose `draft_length` there is above 0, in a step of len(running) decodes, at most
        `max_num_draft_tokens` (the proposer's k, the token budget) and never past its end. Its tokens
        sampled in flight count as known: they are by then.

        The answer errs towards drafting: the budget the sequences before it leave and the drafts a
        verification in flight accepts are not known yet. While it is True plans go one at a time
        (`ExecutorReplica`): a plan scheduled while a step of a sequence is in flight never drafts for
        it (`Scheduler._drafts`: its drafts follow its last token, not known yet)."""
        num_decodes = len(running)
        for seq in running:
            if not seq.speculative or seq.num_uncomputed_tokens > 1:
                continue  # (a decode in flight leaves 1, a verification 1 - drafts, a chunk of a prompt more)
            end = seq.num_tokens_limit(max_model_len)
            limit = min(max_num_draft_tokens, end - seq.num_tokens_with_placeholders - 1)
            if self.draft_length(seq.draft_acceptance, limit, num_decodes) > 0:
                return True
        return False

    def _bar(self, num_decodes: int) -> float:
        return self.step_time.token_share(num_decodes) + self._draft_share(num_decodes)

    def _draft_share(self, num_tokens: int) -> float:
        step_seconds = self.step_time.fixed + self.step_time.per_token * num_tokens
        cost = self.draft_cost.seconds_per_draft_token * num_tokens
        return cost / step_seconds if step_seconds > 0 else 0.0

    @staticmethod
    def learned(acceptance: float, num_drafted: int, num_accepted: int) -> float:
        """The per-token acceptance after a verification: each accepted token is a success, the first
        rejected one (if any) a failure, and the tokens after it were never tried on their own. The
        verification's trials weigh alike (1 - (1 - _LEARN)^trials in all), so the rate tracks accepted /
        tried over recent verifications; accepted / drafted would under-state long drafts."""
        assert 0 <= num_accepted <= num_drafted
        num_tried = num_accepted + (num_accepted < num_drafted)
        weight = 1.0 - (1.0 - _LEARN) ** num_tried
        return acceptance + (num_accepted / num_tried - acceptance) * weight

    @staticmethod
    def recovered(acceptance: float) -> float:
        return acceptance + (PRIOR_ACCEPTANCE - acceptance) * _RECOVER
