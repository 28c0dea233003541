"""The executor started with --enable-lora as a real gRPC server: Describe, adapter loads over the Step stream."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from executor_service.tiny_model import create_tiny_model
from shared.step_plan import AdapterLoad, ContinuedSequence, NewSequence, SequenceId, StepPlan
from tests.helpers.peft_adapters import make_peft_adapter, peft_greedy
from tests.helpers.processes import running_executor
from tests.helpers.step_stream import StepStream

NUM_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("base"), seed=0)


@pytest.fixture(scope="module")
def adapter_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_peft_adapter(
        base_dir, tmp_path_factory.mktemp("adapter"), rank=8, target_modules=["q_proj", "v_proj", "up_proj"],
        lora_alpha=16, use_rslora=True, seed=5,
    )


@pytest.fixture(scope="module")
def executor_address(base_dir: Path) -> str:
    with running_executor(
        base_dir, "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--max-cpu-loras", "4",
        "--num-gpu-blocks-override", "32", "--swap-space", "0.01",
    ) as address:
        yield address


def test_describe_reports_lora_slots_and_rank(executor_address):
    with StepStream(executor_address) as stream:
        description = stream.describe()
    assert (description.max_loras, description.max_lora_rank) == (2, 8)
    assert description.model.intermediate_size == 176


def test_adapter_and_base_sequences_over_the_stream_equal_peft(executor_address, base_dir, adapter_dir):
    prompt = [7, 40, 99, 3, 120, 54, 18]
    with StepStream(executor_address) as stream:
        refused = stream.step(StepPlan(
            1, (NewSequence(SequenceId(1), tuple(prompt), len(prompt), 0, (0,), len(prompt), lora_slot=1),),
            adapter_loads=(AdapterLoad(1, "etc", "/etc/passwd"),),
        ))
        assert refused.error is not None and refused.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "'/etc/passwd' is not a directory" in refused.error.message
        outputs: dict[int, list[int]] = {1: [], 2: []}
        result = stream.step(StepPlan(
            1,
            (
                NewSequence(SequenceId(1), tuple(prompt), len(prompt), 0, (0,), len(prompt), lora_slot=1),
                NewSequence(SequenceId(2), tuple(prompt), len(prompt), 0, (1,), len(prompt)),
            ),
            adapter_loads=(AdapterLoad(1, "a", str(adapter_dir)),),
        ))
        for step_id in range(2, NUM_NEW_TOKENS + 1):
            assert result.error is None, result.error
            for output in result.outputs:
                outputs[output.sequence_id] += output.token_ids
            result = stream.step(StepPlan(
                step_id, continued_sequences=(ContinuedSequence(SequenceId(1), 1), ContinuedSequence(SequenceId(2), 1)),
            ))
        assert result.error is None, result.error
        for output in result.outputs:
            outputs[output.sequence_id] += output.token_ids
    assert outputs[1] == peft_greedy(base_dir, adapter_dir, prompt, NUM_NEW_TOKENS)
    assert outputs[2] == peft_greedy(base_dir, None, prompt, NUM_NEW_TOKENS)
    assert outputs[1] != outputs[2]
