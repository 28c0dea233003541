"""The executor verifies draft tokens in the same forward: a right draft is accepted whole, a wrong one
up to its first wrong token, and either way the tokens are the model's own greedy ones; malformed
drafts are refused before anything changes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from executor_service.executor import Executor
from executor_service.executor_config import ExecutorConfig
from executor_service.model_runner import ModelRunner
from executor_service.tiny_model import create_tiny_model
from shared.step_plan import ContinuedSequence, NewSequence, SequenceId, StepPlan

BLOCK_SIZE = 8
PROMPT = [5, 17, 33, 2, 91, 7, 7, 40]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("drafts") / "tiny", seed=4)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([PROMPT])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
                         pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@pytest.fixture(scope="module")
def executor(model_dir: Path) -> Executor:
    return Executor.load(ExecutorConfig(model_dir=str(model_dir), block_size=BLOCK_SIZE,
                                        num_device_blocks_override=16, swap_space_gib=0.001, seed=0))


@pytest.fixture
def runner(executor: Executor) -> ModelRunner:
    executor.runner.reset()
    return executor.runner


def prefill(runner: ModelRunner) -> int:
    """Prefill the prompt into blocks 0..3 (32 slots); returns the first sampled token."""
    result = runner.execute(StepPlan(step_id=1, new_sequences=(
        NewSequence(SequenceId(1), tuple(PROMPT), len(PROMPT), 0, (0, 1, 2, 3), len(PROMPT)),
    )))
    assert result.error is None
    return result.outputs[0].token_ids[0]


def test_drafts_are_accepted_up_to_the_first_wrong_token(runner: ModelRunner, reference: list[int]) -> None:
    assert prefill(runner) == reference[0]
    step_id, produced = 2, [reference[0]]
    drafts_per_step = [
        tuple(reference[1:4]),  # all right: 3 accepted + 1 more
        (reference[5], 255, reference[7]),  # right, then wrong: 1 accepted + the model's own
        (255, 254),  # wrong at once: only the model's own token
    ]
    for index in range(3):
        drafts = drafts_per_step[index]
        result = runner.execute(StepPlan(step_id=step_id, continued_sequences=(
            ContinuedSequence(SequenceId(1), 1 + len(drafts), (), drafts),
        )))
        assert result.error is None, result.error
        got = list(result.outputs[0].token_ids)
        expected_accepted = next((j for j, d in enumerate(drafts) if d != reference[len(produced) + j]), len(drafts))
        assert got == reference[len(produced) : len(produced) + expected_accepted + 1]
        produced += got
        step_id += 1
    # Rejected draft positions were overwritten: a plain decode continues the reference.
    result = runner.execute(StepPlan(step_id=step_id, continued_sequences=(ContinuedSequence(SequenceId(1), 1),)))
    assert list(result.outputs[0].token_ids) == [reference[len(produced)]]
    state = runner.batch.sequences[SequenceId(1)]
    assert state.num_computed_tokens == len(PROMPT) + len(produced)


@pytest.mark.parametrize(
    ("num_scheduled", "drafts", "message"),
    [
        (2, (3, 4), "must compute up to their end"),
        (3, (3, 400), "outside the vocabulary"),
        (1, (3,), "must compute up to their end"),
    ],
)
def test_malformed_drafts_are_refused_and_change_nothing(
    runner: ModelRunner, num_scheduled: int, drafts: tuple[int, ...], message: str
) -> None:
    prefill(runner)
    state = runner.batch.sequences[SequenceId(1)]
    before = (list(state.token_ids), state.num_computed_tokens)
    result = runner.execute(StepPlan(step_id=2, continued_sequences=(
        ContinuedSequence(SequenceId(1), num_scheduled, (), drafts),
    )))
    assert result.error is not None and result.error.code == INVALID_ARGUMENT and message in result.error.message
    assert (list(state.token_ids), state.num_computed_tokens) == before
