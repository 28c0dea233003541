"""The executor bounds what one plan may make it hold: no sequence longer than its max_model_len, even
when only part of it is scheduled, and no block table longer than such a sequence needs (a 20M-token
sequence once took an executor from 260 MB to 805 MB)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from executor_service.executor import Executor
from executor_service.executor_config import ExecutorConfig
from executor_service.tiny_model import TinyModelConfig, create_tiny_model
from shared.step_plan import NewSequence, SequenceId, StepPlan

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@pytest.fixture(scope="module")
def executor(tmp_path_factory: pytest.TempPathFactory) -> Executor:
    model = create_tiny_model(tmp_path_factory.mktemp("bounds") / "tiny", seed=0,
                              config=TinyModelConfig(max_position_embeddings=64))
    return Executor.load(ExecutorConfig(model_dir=str(model), block_size=8, num_device_blocks_override=32,
                                        swap_space_gib=0.001))


@pytest.mark.parametrize(
    ("num_tokens", "num_blocks", "message"),
    [
        (65, 1, "65 tokens, more than max_model_len 64"),
        (1_000_000, 1, "more than max_model_len 64"),
        (8, 9, "9 blocks, more than the 8 max_model_len 64 needs"),
    ],
)
def test_oversized_sequences_are_refused_whatever_is_scheduled(
    executor: Executor, num_tokens: int, num_blocks: int, message: str
) -> None:
    executor.runner.reset()
    plan = StepPlan(step_id=1, new_sequences=(
        NewSequence(SequenceId(1), tuple([3] * num_tokens), 1, 0, tuple(range(num_blocks)), 1),
    ))
    result = executor.runner.execute(plan)
    assert result.error is not None and result.error.code == INVALID_ARGUMENT
    assert message in result.error.message
    assert not executor.runner.batch.sequences
