"""When drafting pays: a step-time model fitted online from the executor's forward times, weighed
against how often each request's drafts are accepted."""

from __future__ import annotations

from dataclasses import dataclass

# Each step's observation weighs this much against everything before it (exponential forgetting).
_FORGET = 0.05
# A request's acceptance rate after a verification: (1 - _LEARN) * old + _LEARN * this draft's rate.
_LEARN = 0.3
# While a request is not drafted, its rate creeps back to the prior by this fraction per decode, so a
# request whose drafts kept failing is tried again now and then.
_RECOVER = 0.05
PRIOR_ACCEPTANCE = 0.7


@dataclass(slots=True)
class StepTimeModel:
    """forward seconds ~= fixed + per_token * tokens, by weighted least squares with forgetting.

    `fixed` is what a step costs whatever its size (reading the weights, launching work); `per_token`
    what each computed token adds. Until two step sizes were seen, `per_token` is unknown (0)."""

    _n: float = 0.0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0
    last_num_tokens: int = 0

    def observe(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        keep = 1.0 - _FORGET
        self._n = self._n * keep + 1.0
        self._sx = self._sx * keep + num_tokens
        self._sy = self._sy * keep + seconds
        self._sxx = self._sxx * keep + num_tokens * num_tokens
        self._sxy = self._sxy * keep + num_tokens * seconds
        self.last_num_tokens = num_tokens

    @property
    def per_token(self) -> float:
        denominator = self._n * self._sxx - self._sx * self._sx
        if self._n < 2 or denominator <= 1e-12:
            return 0.0
        return max(0.0, (self._n * self._sxy - self._sx * self._sy) / denominator)

    @property
    def fixed(self) -> float:
        if self._n == 0:
            return 0.0
        return max(0.0, (self._sy - self.per_token * self._sx) / self._n)

    def token_share(self, num_tokens: int) -> float:
        """Of a step of `num_tokens` tokens, the share of its time its tokens cost (0: all fixed)."""
        per_token, fixed = self.per_token, self.fixed
        total = fixed + per_token * num_tokens
        return per_token * num_tokens / total if total > 0 else 0.0


class SpeculationPolicy:
    """Drafting k tokens for a request adds k tokens to the step (everyone waits `per_token * k` more)
    and gains the accepted ones. With N tokens in the step, fixed cost a and per-token cost b,
    throughput rises exactly when accepted / drafted >= N b / (a + N b), the step's token share: near 0
    on an idle, memory-bound executor (draft freely), near 1 when the forward is compute-bound (only
    requests whose drafts are nearly always right). N is the last step's size."""

    def __init__(self) -> None:
        self.step_time = StepTimeModel()

    def worth_drafting(self, acceptance: float) -> bool:
        return acceptance >= self.step_time.token_share(self.step_time.last_num_tokens)

    @staticmethod
    def learned(acceptance: float, num_drafted: int, num_accepted: int) -> float:
        return (1.0 - _LEARN) * acceptance + _LEARN * (num_accepted / num_drafted)

    @staticmethod
    def recovered(acceptance: float) -> float:
        return acceptance + (PRIOR_ACCEPTANCE - acceptance) * _RECOVER
