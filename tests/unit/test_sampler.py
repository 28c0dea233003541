"""The executor's batched sampler: each transform's exact effect, distributions, seeded reproducibility."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import pytest
import torch

from executor_service.sampler import Sampler, SamplingRow, seeded_uniform
from shared.step_plan import SamplingOptions

CPU = torch.device("cpu")
# Chi-square critical values at p = 1e-4 by degrees of freedom; a fair sampler exceeds them 1 in 10,000.
CHI_SQUARE_CRITICAL = {1: 15.14, 5: 25.74, 7: 29.88}


def make_row(
    options: SamplingOptions,
    t: int = 0,
    prompt: Sequence[int] = (),
    output: Sequence[int] | None = None,
) -> SamplingRow:
    return SamplingRow(
        options=options,
        output_position=t,
        prompt_token_ids=tuple(prompt),
        output_token_ids=tuple(output) if output is not None else tuple(range(t)),
    )


def random_logits(num_rows: int, vocab_size: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(num_rows, vocab_size, generator=torch.Generator().manual_seed(seed)) * scale


def seeded_draws(probs: Sequence[float], options: SamplingOptions, num_draws: int) -> Counter[int]:
    """Token counts of `num_draws` seeded draws (positions 0..num_draws-1) from `probs` in one batch."""
    sampler = Sampler(vocab_size=len(probs), device=CPU)
    logits = torch.tensor(probs).log().expand(num_draws, -1).contiguous()
    rows = [make_row(options, t=t, output=()) for t in range(num_draws)]
    return Counter(sampler.sample(logits, rows).token_ids)


def chi_square(counts: Counter[int], expected_probs: dict[int, float]) -> float:
    total = sum(counts.values())
    return sum((counts[i] - total * p) ** 2 / (total * p) for i, p in expected_probs.items())


def test_all_greedy_is_argmax_and_leaves_logits_untouched() -> None:
    logits = random_logits(6, 50)
    before = logits.clone()
    sampler = Sampler(vocab_size=50, device=CPU)
    rows = [make_row(SamplingOptions()) for _ in range(6)]
    out = sampler.sample(logits, rows)
    assert out.token_ids == tuple(logits.argmax(dim=-1).tolist())
    assert out.logprobs == (None,) * 6
    assert out.top_logprobs == ((),) * 6
    assert sampler.penalised_logits(logits, rows) is logits
    assert torch.equal(logits, before)


def test_mixed_batch_keeps_row_order() -> None:
    logits = random_logits(5, 40, seed=1)
    sampler = Sampler(vocab_size=40, device=CPU)
    greedy = SamplingOptions()
    top1 = SamplingOptions(temperature=1.0, top_k=1)
    rows = [make_row(o) for o in (top1, greedy, top1, greedy, greedy)]
    assert sampler.sample(logits, rows).token_ids == tuple(logits.argmax(dim=-1).tolist())


def test_top_k_one_equals_greedy() -> None:
    logits = random_logits(32, 1000, seed=2)
    sampler = Sampler(vocab_size=1000, device=CPU)
    rows = [make_row(SamplingOptions(temperature=1.5, top_k=1, seed=t), t=t) for t in range(32)]
    assert sampler.sample(logits, rows).token_ids == tuple(logits.argmax(dim=-1).tolist())


def test_top_k_never_samples_outside_the_top_k() -> None:
    row_logits = random_logits(1, 64, seed=3, scale=0.3)
    top5 = set(row_logits.topk(5).indices[0].tolist())
    counts = seeded_draws(row_logits[0].softmax(-1).tolist(), SamplingOptions(temperature=1.0, top_k=5), 2000)
    assert set(counts) == top5


@pytest.mark.parametrize("top_k", [0, -1, 64, 1000])
def test_top_k_disabled_values_sample_the_whole_vocabulary(top_k: int) -> None:
    counts = seeded_draws([1 / 8] * 8, SamplingOptions(temperature=1.0, top_k=top_k, seed=5), 800)
    assert set(counts) == set(range(8))


def test_top_p_keeps_exactly_the_nucleus_with_renormalised_frequencies() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    counts = seeded_draws(probs, SamplingOptions(temperature=1.0, top_p=0.75, seed=11), 8000)
    assert set(counts) == {0, 1}
    assert chi_square(counts, {0: 0.5 / 0.8, 1: 0.3 / 0.8}) < CHI_SQUARE_CRITICAL[1]


def test_top_p_small_nucleus_over_a_large_vocabulary() -> None:
    vocab_size = 2000
    logits = random_logits(1, vocab_size, seed=4, scale=2.0)[0]
    probs = logits.softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(0) - sorted_probs
    nucleus = set(order[before < 0.3].tolist())
    sampler = Sampler(vocab_size=vocab_size, device=CPU)
    rows = [make_row(SamplingOptions(temperature=1.0, top_p=0.3, seed=7), t=t) for t in range(3000)]
    drawn = Counter(sampler.sample(logits.expand(3000, -1).contiguous(), rows).token_ids)
    assert 1 < len(nucleus) < 50
    assert set(drawn) == nucleus
    mass = sum(probs[i].item() for i in nucleus)
    expected = {i: probs[i].item() / mass for i in nucleus}
    top = max(nucleus, key=lambda i: expected[i])
    assert abs(drawn[top] / 3000 - expected[top]) < 0.03


@pytest.mark.parametrize(("min_p", "kept"), [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.7, {0})])
def test_min_p_drops_tokens_below_min_p_times_the_max(min_p: float, kept: set[int]) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    assert set(seeded_draws(probs, SamplingOptions(temperature=1.0, min_p=min_p, seed=3), 2000)) == kept


def test_top_p_applies_to_the_renormalised_top_k() -> None:
    # Renormalised over the top 3, token 2 starts at cumulative 0.777 > 0.75 and is cut; unnormalised
    # it would start at 0.7 and survive.
    probs = [0.4, 0.3, 0.2, 0.1]
    counts = seeded_draws(probs, SamplingOptions(temperature=1.0, top_k=3, top_p=0.75, seed=2), 2000)
    assert set(counts) == {0, 1}


def test_temperature_matches_the_softmax_distribution() -> None:
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 0.3, -1.0, 0.8, 0.1])
    for temperature in (0.7, 2.0):
        expected = (logits / temperature).softmax(-1).tolist()
        options = SamplingOptions(temperature=temperature, seed=9)
        counts = seeded_draws(logits.softmax(-1).tolist(), options, 20000)
        assert chi_square(counts, dict(enumerate(expected))) < CHI_SQUARE_CRITICAL[7]


def test_draws_across_cdf_blocks_match_the_distribution() -> None:
    # Mass on both sides of the 256-token block edges and in the padded last block.
    vocab_size = 1000
    weights = {0: 0.1, 255: 0.15, 256: 0.2, 511: 0.05, 777: 0.2, 999: 0.3}
    probs = [weights.get(i, 0.0) for i in range(vocab_size)]
    counts = seeded_draws(probs, SamplingOptions(temperature=1.0, seed=21), 20000)
    assert set(counts) == set(weights)
    assert chi_square(counts, weights) < CHI_SQUARE_CRITICAL[5]


def test_tiny_top_p_keeps_only_the_most_likely_token() -> None:
    logits = random_logits(16, 500, seed=14)
    sampler = Sampler(vocab_size=500, device=CPU)
    rows = [make_row(SamplingOptions(temperature=1.0, top_p=1e-9, seed=3), t=t) for t in range(16)]
    assert sampler.sample(logits, rows).token_ids == tuple(logits.argmax(dim=-1).tolist())


def test_non_finite_logits_still_return_in_vocabulary_ids() -> None:
    logits = random_logits(3, 10, seed=15)
    logits[0] = -math.inf
    logits[1, 3] = math.nan
    logits[2, 2] = math.inf
    rows = [make_row(SamplingOptions(temperature=1.0, top_p=0.5, seed=1)) for _ in range(3)]
    assert all(0 <= token < 10 for token in Sampler(vocab_size=10, device=CPU).sample(logits, rows).token_ids)


def test_unseeded_rows_follow_the_distribution_with_one_draw_each() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    sampler = Sampler(vocab_size=4, device=CPU)
    rows = [make_row(SamplingOptions(temperature=1.0)) for _ in range(20000)]
    counts = Counter(sampler.sample(probs.log().expand(20000, -1).contiguous(), rows).token_ids)
    # Not seeded, so held to p = 1e-6 (df 3) rather than the seeded tests' 1e-4.
    assert chi_square(counts, dict(enumerate(probs.tolist()))) < 30.66


def test_repetition_penalty_changes_the_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0]])
    sampler = Sampler(vocab_size=4, device=CPU)
    plain = make_row(SamplingOptions(), t=1, prompt=[0], output=[3])
    penalised = make_row(SamplingOptions(repetition_penalty=1.5), t=1, prompt=[0], output=[3])
    assert sampler.sample(logits, [plain]).token_ids == (0,)
    assert sampler.sample(logits, [penalised]).token_ids == (1,)
    expected = torch.tensor([[2.0 / 1.5, 1.5, 0.0, -1.5]])
    assert torch.allclose(sampler.penalised_logits(logits, [penalised]), expected, rtol=0, atol=1e-6)


def test_presence_and_frequency_penalties_count_output_tokens_only() -> None:
    logits = random_logits(2, 6, seed=6)
    options = SamplingOptions(presence_penalty=0.5, frequency_penalty=0.25)
    rows = [make_row(options, t=4, prompt=[3, 3, 5], output=[1, 1, 1, 2]), make_row(SamplingOptions())]
    penalised = Sampler(vocab_size=6, device=CPU).penalised_logits(logits, rows)
    expected = logits.clone()
    expected[0, 1] -= 0.5 + 3 * 0.25
    expected[0, 2] -= 0.5 + 1 * 0.25
    assert torch.allclose(penalised, expected, rtol=0, atol=1e-6)
    assert torch.equal(penalised[1], logits[1])


def test_penalties_are_applied_before_logprobs_are_taken_from_raw_logits() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, -2.0]])
    row = make_row(SamplingOptions(frequency_penalty=1.0, logprobs=2), t=1, output=[0])
    before = logits.clone()
    out = Sampler(vocab_size=4, device=CPU).sample(logits, [row])
    raw = torch.log_softmax(before, dim=-1)[0]
    assert out.token_ids == (1,)
    assert out.logprobs[0] == pytest.approx(raw[1].item(), abs=1e-6)
    assert [i for i, _ in out.top_logprobs[0]] == [0, 1]
    assert torch.equal(logits, before)


def test_min_tokens_bans_eos_until_the_position() -> None:
    eos = 2
    logits = torch.tensor([[0.5, 1.0, 4.0, 0.0]]).expand(3, -1).contiguous()
    options = SamplingOptions(min_tokens=2, banned_token_ids_before_min_tokens=(eos,))
    rows = [make_row(options, t=t) for t in range(3)]
    sampler = Sampler(vocab_size=4, device=CPU)
    assert sampler.sample(logits, rows).token_ids == (1, 1, eos)
    penalised = sampler.penalised_logits(logits, rows)
    assert penalised[0, eos].item() == -math.inf and penalised[1, eos].item() == -math.inf
    assert torch.equal(penalised[2], logits[2])
    sampled = SamplingOptions(
        temperature=1.0, seed=1, min_tokens=10**6, banned_token_ids_before_min_tokens=(eos,)
    )
    assert eos not in seeded_draws([0.1, 0.1, 0.7, 0.1], sampled, 1000)


def test_logprobs_are_the_raw_log_softmax_with_ordered_top_n() -> None:
    vocab_size = 100
    logits = random_logits(4, vocab_size, seed=8)
    rows = [
        make_row(SamplingOptions(temperature=0.5, top_k=3, repetition_penalty=1.3, seed=1, logprobs=5), t=2),
        make_row(SamplingOptions(logprobs=0)),
        make_row(SamplingOptions(temperature=1.0)),
        make_row(SamplingOptions(logprobs=20)),
    ]
    out = Sampler(vocab_size=vocab_size, device=CPU).sample(logits, rows)
    reference = torch.log_softmax(logits, dim=-1)
    for i in (0, 1, 3):
        assert out.logprobs[i] == pytest.approx(reference[i, out.token_ids[i]].item(), abs=1e-6)
    assert out.logprobs[2] is None
    assert out.top_logprobs[1] == () and out.top_logprobs[2] == ()
    for i, n in ((0, 5), (3, 20)):
        best = reference[i].topk(n)
        assert [token for token, _ in out.top_logprobs[i]] == best.indices.tolist()
        values = [value for _, value in out.top_logprobs[i]]
        assert values == pytest.approx(best.values.tolist(), abs=1e-6)
        assert values == sorted(values, reverse=True)


def test_rejects_too_many_logprobs_and_misshaped_logits() -> None:
    sampler = Sampler(vocab_size=10, device=CPU, max_logprobs=5)
    with pytest.raises(ValueError, match="logprobs=6"):
        sampler.sample(torch.zeros(1, 10), [make_row(SamplingOptions(logprobs=6))])
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(torch.zeros(2, 10), [make_row(SamplingOptions())])
    with pytest.raises(ValueError, match="shape"):
        sampler.sample(torch.zeros(1, 9), [make_row(SamplingOptions())])


def test_never_returns_an_id_past_the_vocabulary() -> None:
    vocab_size = 30
    logits = torch.cat([random_logits(40, vocab_size, seed=10), torch.full((40, 2), 100.0)], dim=1)
    sampler = Sampler(vocab_size=vocab_size, device=CPU)
    rows = [make_row(SamplingOptions()) for _ in range(10)]
    rows += [make_row(SamplingOptions(temperature=1.0, top_p=0.9, seed=t), t=t) for t in range(15)]
    rows += [make_row(SamplingOptions(temperature=5.0, logprobs=3)) for _ in range(15)]
    out = sampler.sample(logits, rows)
    assert max(out.token_ids) < vocab_size
    assert all(token < vocab_size for top in out.top_logprobs for token, _ in top)


def test_seeded_draw_depends_only_on_seed_and_position() -> None:
    vocab_size = 32000
    target_logits = random_logits(1, vocab_size, seed=12)
    others = random_logits(6, vocab_size, seed=13)
    for options in (
        SamplingOptions(temperature=1.0, seed=1234),
        SamplingOptions(temperature=0.8, top_p=0.5, top_k=200, min_p=0.01, seed=99, presence_penalty=0.3),
    ):
        target = make_row(options, t=5)

        def token_in(batch: list[tuple[torch.Tensor, SamplingRow]], at: int) -> int:
            logits = torch.cat([row_logits for row_logits, _ in batch])
            sampler = Sampler(vocab_size=vocab_size, device=CPU)
            return sampler.sample(logits, [row for _, row in batch]).token_ids[at]

        alone = token_in([(target_logits, target)], 0)
        neighbours = [
            (others[0:1], make_row(SamplingOptions())),
            (others[1:2], make_row(SamplingOptions(temperature=1.0))),
            (others[2:3], make_row(SamplingOptions(temperature=1.0, seed=1234), t=6)),
            (others[3:4], make_row(SamplingOptions(temperature=0.7, top_p=0.2, seed=5), t=5)),
            (others[4:5], make_row(SamplingOptions(temperature=1.0, top_p=0.1))),
            (others[5:6], make_row(SamplingOptions(repetition_penalty=1.2, logprobs=3), prompt=[1, 2])),
        ]
        assert token_in(neighbours[:2] + [(target_logits, target)], 2) == alone
        assert token_in([(target_logits, target)] + neighbours, 0) == alone
        assert token_in(neighbours[3:] + [(target_logits, target)] + neighbours[:3], 3) == alone

    positions = [make_row(SamplingOptions(temperature=1.0, seed=1234), t=t) for t in range(16)]
    sampler = Sampler(vocab_size=vocab_size, device=CPU)
    draws = sampler.sample(target_logits.expand(16, -1), positions).token_ids
    assert len(set(draws)) > 12


def test_seeded_uniform_is_a_pure_function_spread_over_the_unit_interval() -> None:
    assert seeded_uniform(7, 3, 0) == seeded_uniform(7, 3, 0)
    values = [seeded_uniform(7, t, 0) for t in range(1000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert len(set(values)) == 1000
    assert abs(sum(values) / 1000 - 0.5) < 0.05
    assert seeded_uniform(7, 3, 1) != seeded_uniform(7, 3, 0) != seeded_uniform(8, 3, 0)
    assert 0.0 <= seeded_uniform(-1, 0, 0) < 1.0


def test_unseeded_rows_get_independent_draws() -> None:
    sampler = Sampler(vocab_size=1000, device=CPU)
    rows = [make_row(SamplingOptions(temperature=1.0)) for _ in range(64)]
    assert len(set(sampler.sample(torch.zeros(64, 1000), rows).token_ids)) > 50
