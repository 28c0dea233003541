"""Speculative sampling is lossless in distribution: with n-gram (point-mass) drafts verified by the
executor, the tokens at each draft position and at the bonus position are distributed as the target's
own softmax (transformers' forward, with transformers' top-k / top-p warpers), by a chi-square
goodness-of-fit test over thousands of seeded draws on a 32-token vocabulary. Fixed seeds: the draws,
hence the statistics, are the same every run. The test's power is checked too: the same test rejects
draws made by wrong acceptance rules."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from executor_service.executor import Executor
from executor_service.executor_config import ExecutorConfig
from executor_service.model_runner import ModelRunner
from executor_service.tiny_model import create_tiny_model
from shared.step_plan import ContinuedSequence, NewSequence, SamplingOptions, SequenceId, StepPlan

VOCAB_SIZE = 32
# The tiny model's lm_head gives logits of std ~6 (nearly one-hot over 32 tokens); a quarter of that
# leaves several likely tokens (the drafts below get p = 0.40-0.56), so drafts are accepted and
# rejected often, and the top-p cut below falls at least 0.006 of mass away from a token boundary.
LM_HEAD_SCALE = 1 / 4
PROMPT = (5, 17, 3, 2, 11, 7, 7, 30)
NUM_DRAWS = 4000
BLOCK_SIZE = 8
BLOCKS_PER_SEQUENCE = 2  # 8 prompt tokens + 2 drafts fit in 16 slots
CHUNK = 256  # sequences per step (the executor's max_num_seqs)
SIGNIFICANCE = 1e-3
MIN_EXPECTED = 5.0  # cells expected fewer times are pooled into one


@dataclass(frozen=True, slots=True)
class Targets:
    """The target's exact next-token distributions after the prompt, after draft 0, after both drafts."""

    drafts: tuple[int, int]
    after_prompt: torch.Tensor
    after_draft_0: torch.Tensor
    after_drafts: torch.Tensor


def chi_square_p_value(counts: Counter[int], probs: torch.Tensor) -> float:
    """P(X >= statistic) for Pearson's goodness-of-fit statistic of `counts` against `probs`.

    Cells expected fewer than MIN_EXPECTED times are pooled into one cell (dropped if the pool itself
    stays under it); a draw in a zero-probability cell gives p = 0. The survival function is the
    regularized upper incomplete gamma Q(df / 2, statistic / 2)."""
    total = sum(counts.values())
    expected = probs.double() * total
    if any(expected[token] == 0 for token in counts):
        return 0.0
    observed = torch.zeros_like(expected)
    for token, count in counts.items():
        observed[token] = count
    large = expected >= MIN_EXPECTED
    cells_expected = [*expected[large].tolist()]
    cells_observed = [*observed[large].tolist()]
    pooled = float(expected[~large].sum())
    if pooled >= MIN_EXPECTED:
        cells_expected.append(pooled)
        cells_observed.append(float(observed[~large].sum()))
    statistic = sum((o - e) ** 2 / e for o, e in zip(cells_observed, cells_expected))
    df = len(cells_expected) - 1
    assert df >= 1, "too few cells for a chi-square test: draw more"
    q = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(statistic / 2, dtype=torch.float64))
    return float(q)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama cut to a 32-token vocabulary (first rows of the embedding and of the LM head)."""
    path = create_tiny_model(tmp_path_factory.mktemp("spec_dist") / "tiny", seed=11)
    weights = load_file(str(path / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:VOCAB_SIZE].clone()
    weights["lm_head.weight"] = weights["lm_head.weight"][:VOCAB_SIZE] * LM_HEAD_SCALE
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.update(vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2)
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


@pytest.fixture(scope="module")
def hf_logits(model_dir: Path) -> Callable[[tuple[int, ...]], torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)

    def last_logits(token_ids: tuple[int, ...]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([token_ids])).logits[0, -1].double()

    return last_logits


def reference_probs(logits: torch.Tensor, options: SamplingOptions) -> torch.Tensor:
    """softmax(logits / T) after transformers' top-k then top-p warpers (the order the sampler uses)."""
    scores = (logits / options.temperature)[None]
    if 0 < options.top_k < VOCAB_SIZE:
        scores = TopKLogitsWarper(options.top_k)(None, scores)
    if options.top_p < 1.0:
        scores = TopPLogitsWarper(options.top_p)(None, scores)
    return torch.softmax(scores[0], dim=-1)


def closest_to_half(probs: torch.Tensor) -> int:
    return int((probs - 0.5).abs().argmin())


def targets_for(hf_logits: Callable[[tuple[int, ...]], torch.Tensor], options: SamplingOptions) -> Targets:
    """Drafts chosen as the tokens whose target probability is nearest 1/2: accepted about half the time."""
    after_prompt = reference_probs(hf_logits(PROMPT), options)
    draft_0 = closest_to_half(after_prompt)
    after_draft_0 = reference_probs(hf_logits((*PROMPT, draft_0)), options)
    draft_1 = closest_to_half(after_draft_0)
    after_drafts = reference_probs(hf_logits((*PROMPT, draft_0, draft_1)), options)
    return Targets((draft_0, draft_1), after_prompt, after_draft_0, after_drafts)


@pytest.fixture(scope="module")
def executor(model_dir: Path) -> Executor:
    return Executor.load(ExecutorConfig(
        model_dir=str(model_dir), block_size=BLOCK_SIZE, num_device_blocks_override=CHUNK * BLOCKS_PER_SEQUENCE,
        swap_space_gib=0.001, max_num_seqs=CHUNK, seed=0,
    ))


def speculative_draws(runner: ModelRunner, options: SamplingOptions, drafts: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The tokens the executor emits for NUM_DRAWS sequences (seeds 0..NUM_DRAWS-1) of the prompt, each
    verifying `drafts` in the step that computes the prompt's last token."""
    emitted: list[tuple[int, ...]] = []
    for first in range(0, NUM_DRAWS, CHUNK):
        runner.reset()
        ids = range(first, min(first + CHUNK, NUM_DRAWS))
        news = tuple(
            NewSequence(
                SequenceId(i), PROMPT, len(PROMPT), 0,
                tuple(range(j * BLOCKS_PER_SEQUENCE, (j + 1) * BLOCKS_PER_SEQUENCE)), len(PROMPT) - 1,
                sampling=SamplingOptions(temperature=options.temperature, top_k=options.top_k,
                                         top_p=options.top_p, seed=i),
            )
            for j, i in enumerate(ids)
        )
        assert runner.execute(StepPlan(step_id=1, new_sequences=news)).error is None
        result = runner.execute(StepPlan(step_id=2, continued_sequences=tuple(
            ContinuedSequence(SequenceId(i), 1 + len(drafts), (), drafts) for i in ids
        )))
        assert result.error is None, result.error
        emitted += [output.token_ids for output in result.outputs]
    runner.reset()
    return emitted


@pytest.mark.parametrize(
    "options",
    [SamplingOptions(temperature=1.0), SamplingOptions(temperature=1.0, top_k=12, top_p=0.9)],
    ids=["temperature-1", "top-k-12-top-p-0.9"],
)
def test_draft_and_bonus_positions_follow_the_target_distribution(
    executor: Executor, hf_logits: Callable[[tuple[int, ...]], torch.Tensor], options: SamplingOptions
) -> None:
    targets = targets_for(hf_logits, options)
    draft_0, draft_1 = targets.drafts
    emitted = speculative_draws(executor.runner, options, targets.drafts)
    # Every output is the accepted prefix of the drafts, then one token the drafts did not give there.
    for tokens in emitted:
        accepted = len(tokens) - 1
        assert tokens[:accepted] == targets.drafts[:accepted] and 1 <= len(tokens) <= 3
        assert accepted == 2 or tokens[accepted] != targets.drafts[accepted]
    at_0 = Counter(tokens[0] for tokens in emitted)
    at_1 = Counter(tokens[1] for tokens in emitted if len(tokens) >= 2)
    bonus = Counter(tokens[2] for tokens in emitted if len(tokens) == 3)
    # Both outcomes are frequent at both draft positions, so both branches of verification are tested.
    assert 0.25 * NUM_DRAWS < at_0[draft_0] < 0.75 * NUM_DRAWS
    assert 0.25 * at_0[draft_0] < at_1[draft_1] < 0.75 * at_0[draft_0]
    assert sum(bonus.values()) == at_1[draft_1] > 500
    assert chi_square_p_value(at_0, targets.after_prompt) > SIGNIFICANCE
    assert chi_square_p_value(at_1, targets.after_draft_0) > SIGNIFICANCE
    assert chi_square_p_value(bonus, targets.after_drafts) > SIGNIFICANCE


def _correct(probs: torch.Tensor, draft: int, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _always_accept(probs: torch.Tensor, draft: int, generator: torch.Generator) -> int:
    return draft


def _resample_from_target(probs: torch.Tensor, draft: int, generator: torch.Generator) -> int:
    """Accept with p(draft), else a fresh draw from p instead of from p without the draft."""
    first = int(torch.multinomial(probs, 1, generator=generator))
    return first if first == draft else int(torch.multinomial(probs, 1, generator=generator))


def _accept_half_the_rejections(probs: torch.Tensor, draft: int, generator: torch.Generator) -> int:
    """A subtle bias: half the draws that should reject the draft keep it anyway."""
    first = int(torch.multinomial(probs, 1, generator=generator))
    return draft if first != draft and torch.rand((), generator=generator) < 0.5 else first


@pytest.mark.parametrize(
    ("rule", "is_lossless"),
    [(_correct, True), (_always_accept, False), (_resample_from_target, False), (_accept_half_the_rejections, False)],
    ids=["correct", "always-accept", "resample-from-target", "accept-half-the-rejections"],
)
def test_the_chi_square_test_rejects_wrong_acceptance_rules(
    hf_logits: Callable[[tuple[int, ...]], torch.Tensor], rule: Callable[..., int], is_lossless: bool
) -> None:
    """With the test's draw count and drafts, the same statistic separates a correct rule from wrong ones
    (draws simulated on the target's exact distribution with a fixed generator)."""
    targets = targets_for(hf_logits, SamplingOptions(temperature=1.0))
    generator = torch.Generator().manual_seed(0)
    draws = Counter(rule(targets.after_prompt, targets.drafts[0], generator) for _ in range(NUM_DRAWS))
    p_value = chi_square_p_value(draws, targets.after_prompt)
    assert (p_value > SIGNIFICANCE) == is_lossless, p_value
