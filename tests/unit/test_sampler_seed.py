"""The executor's --seed: it seeds the sampler's draws for requests that bring no seed of their own."""

from __future__ import annotations

import torch

from executor_service.sampler import Sampler, SamplingRow
from shared.step_plan import SamplingOptions


def unseeded_tokens(seed: int | None) -> list[int]:
    sampler = Sampler(vocab_size=50, device=torch.device("cpu"), seed=seed)
    logits = torch.zeros(4, 50)  # uniform: every draw depends only on the generator
    rows = [SamplingRow(SamplingOptions(temperature=1.0), 0, (1,), ()) for _ in range(4)]
    return [t for _ in range(5) for t in sampler.sample(logits, rows).token_ids]


def test_the_same_seed_gives_the_same_unseeded_draws_and_another_seed_others() -> None:
    assert unseeded_tokens(7) == unseeded_tokens(7)
    assert unseeded_tokens(7) != unseeded_tokens(8)
    assert unseeded_tokens(None) != unseeded_tokens(None)
