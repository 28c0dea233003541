"""Greedy generation with the CUDA kernels equals transformers on the same fp32 weights.

Drives the executor in-process: a small test scheduler hands out shuffled blocks, prefills one prompt
in chunks (so a chunk attends over a cached prefix) while the others decode beside it.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import transformers

from executor_service.executor import Executor
from executor_service.executor_config import ExecutorConfig
from executor_service.tiny_model import TinyModelConfig, create_tiny_model
from shared.step_plan import ContinuedSequence, NewSequence, SequenceId, StepPlan

MAX_NEW_TOKENS = 24
PREFILL_CHUNK = 48
PROMPT_LENS = (5, 37, 130)
MODELS = {
    # The default tiny model: head_dim 16, two query heads per KV head.
    "tiny_head_dim16": TinyModelConfig(),
    # head_dim 64 and GQA ratio 4, as in real checkpoints.
    "head_dim64_gqa4": dataclasses.replace(
        TinyModelConfig().with_hidden_size(256), num_attention_heads=4, num_key_value_heads=1
    ),
}


@dataclasses.dataclass
class DrivenSequence:
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed: int = 0
    block_ids: list[int] = dataclasses.field(default_factory=list)
    is_sent: bool = False

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


def generate_with_executor(executor: Executor, prompts: list[list[int]], block_size: int) -> list[list[int]]:
    num_blocks = executor.info.num_device_blocks
    free_blocks = list(range(num_blocks))
    random.Random(7).shuffle(free_blocks)
    sequences = {SequenceId(i): DrivenSequence(list(p), len(p)) for i, p in enumerate(prompts)}
    finished: list[int] = []
    step_id = 0
    while any(s.num_outputs < MAX_NEW_TOKENS for s in sequences.values()):
        new, continued = [], []
        scheduled: dict[SequenceId, int] = {}
        for sequence_id, sequence in sequences.items():
            if sequence.num_outputs >= MAX_NEW_TOKENS:
                continue
            num_tokens = min(PREFILL_CHUNK, len(sequence.token_ids) - sequence.num_computed)
            end = sequence.num_computed + num_tokens
            added = [free_blocks.pop() for _ in range(-(-end // block_size) - len(sequence.block_ids))]
            sequence.block_ids += added
            scheduled[sequence_id] = num_tokens
            if sequence.is_sent:
                continued.append(ContinuedSequence(sequence_id, num_tokens, tuple(added)))
            else:
                sequence.is_sent = True
                new.append(
                    NewSequence(
                        sequence_id=sequence_id,
                        token_ids=tuple(sequence.token_ids),
                        num_prompt_tokens=sequence.num_prompt_tokens,
                        num_computed_tokens=0,
                        block_ids=tuple(sequence.block_ids),
                        num_scheduled_tokens=num_tokens,
                    )
                )
        step_id += 1
        plan = StepPlan(step_id, tuple(new), tuple(continued), finished_sequence_ids=tuple(finished))
        finished = []
        result = executor.runner.execute(plan)
        assert result.error is None, result.error
        for output in result.outputs:
            sequence = sequences[output.sequence_id]
            sequence.num_computed += scheduled[output.sequence_id]
            sequence.token_ids += output.token_ids
            if sequence.num_outputs >= MAX_NEW_TOKENS:
                finished.append(output.sequence_id)
    return [s.token_ids[s.num_prompt_tokens :][:MAX_NEW_TOKENS] for s in sequences.values()]


def generate_with_transformers(
    model_dir: str, prompts: list[list[int]], device: torch.device
) -> list[list[int]]:
    """Greedy decoding by full recomputation: no cache, nothing shared with pagewire's code."""
    model = (
        transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    )
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            token_ids = list(prompt)
            for _ in range(MAX_NEW_TOKENS):
                logits = model(torch.tensor([token_ids], device=device)).logits[0, -1]
                token_ids.append(int(logits.argmax()))
            outputs.append(token_ids[len(prompt) :])
    return outputs


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("ops_backend", ["cuda", "torch"])
def test_greedy_generation_equals_transformers(tmp_path, kernel_target, model_name, ops_backend):
    device = kernel_target.device
    model_dir = str(create_tiny_model(tmp_path / "model", seed=3, config=MODELS[model_name]))
    block_size = 16
    executor = Executor.load(
        ExecutorConfig(
            model_dir=model_dir,
            device=device.type,
            dtype="float32",
            ops_backend=ops_backend,
            block_size=block_size,
            num_device_blocks_override=128,
            swap_space_gib=0.01,
            max_num_batched_tokens=512,
            max_num_seqs=8,
        ),
        ops=kernel_target.ops if ops_backend == "cuda" else None,
    )
    assert executor.info.ops_backend == ops_backend
    generator = torch.Generator().manual_seed(5)
    vocab_size = executor.info.model_config.vocab_size
    prompts = [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENS]
    expected = generate_with_transformers(model_dir, prompts, device)
    launches = kernel_target.num_kernel_launches()
    assert generate_with_executor(executor, prompts, block_size) == expected
    kernel_target.assert_launched(launches, expected=ops_backend == "cuda")
