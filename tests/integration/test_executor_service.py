"""The executor as a real gRPC server driven by hand-made plans, checked against transformers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from executor_service.tiny_model import create_tiny_model
from shared.step_plan import (
    BlockPairs,
    ContinuedSequence,
    NewSequence,
    SamplingOptions,
    SequenceId,
    StepPlan,
    StepResult,
)
from tests.helpers.hf_reference import hf_greedy_all
from tests.helpers.processes import running_executor
from tests.helpers.step_stream import StepStream

BLOCK_SIZE = 16
NUM_NEW_TOKENS = 12
PROMPT_LENGTHS = (3, 7, 12, 17, 20, 25, 31, 40, 48, 64)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "llama":
        return create_tiny_model(path, seed=1)
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2,
        eos_token_id=1, bos_token_id=0,
    )
    Qwen2ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def executor_address(model_dir: Path) -> str:
    with running_executor(model_dir, "--num-gpu-blocks-override", "64", "--swap-space", "0.01") as address:
        yield address


def hf_greedy(model_dir: Path, prompt: list[int], num_new_tokens: int) -> list[int]:
    return hf_greedy_all(model_dir, [prompt], num_new_tokens)[0]


def make_prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1234)
    return [torch.randint(2, vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


@dataclass
class HandSequence:
    prompt: list[int]
    outputs: list[int] = field(default_factory=list)
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    num_blocks_sent: int = 0
    known: bool = False


class HandDriver:
    """A deliberately simple plan maker: a free list of blocks and explicit per-step decisions."""

    def __init__(self, stream: StepStream, num_blocks: int, chunk_size: int) -> None:
        self.stream = stream
        self.free_blocks = list(range(num_blocks))
        self.chunk_size = chunk_size
        self.sequences: dict[int, HandSequence] = {}
        self.step_id = 0

    def tokens(self, seq: HandSequence) -> list[int]:
        return seq.prompt + seq.outputs

    def _grow(self, seq: HandSequence, num_tokens: int) -> None:
        while len(seq.blocks) * BLOCK_SIZE < num_tokens:
            seq.blocks.append(self.free_blocks.pop(0))

    def step(
        self,
        active: list[int],
        finished: tuple[int, ...] = (),
        preempted: tuple[int, ...] = (),
        swap_out: BlockPairs = BlockPairs(),
        swap_in: BlockPairs = BlockPairs(),
    ) -> StepResult:
        self.step_id += 1
        new, continued = [], []
        for sequence_id in active:
            seq = self.sequences[sequence_id]
            num_tokens = len(self.tokens(seq))
            scheduled = min(num_tokens - seq.num_computed, self.chunk_size)
            self._grow(seq, seq.num_computed + scheduled)
            if not seq.known:
                new.append(NewSequence(
                    sequence_id=SequenceId(sequence_id), token_ids=tuple(self.tokens(seq)),
                    num_prompt_tokens=len(seq.prompt), num_computed_tokens=seq.num_computed,
                    block_ids=tuple(seq.blocks), num_scheduled_tokens=scheduled,
                    sampling=SamplingOptions(temperature=0.0),
                ))
                seq.known = True
            else:
                continued.append(ContinuedSequence(
                    sequence_id=SequenceId(sequence_id), num_scheduled_tokens=scheduled,
                    new_block_ids=tuple(seq.blocks[seq.num_blocks_sent:]),
                ))
            seq.num_blocks_sent = len(seq.blocks)
            seq.num_computed += scheduled
        plan = StepPlan(
            step_id=self.step_id, new_sequences=tuple(new), continued_sequences=tuple(continued),
            finished_sequence_ids=finished, preempted_sequence_ids=preempted,
            swap_out=swap_out, swap_in=swap_in,
        )
        result = self.stream.step(plan)
        assert result.error is None, result.error
        assert [o.sequence_id for o in result.outputs] == [s.sequence_id for s in new + continued]
        for output in result.outputs:
            seq = self.sequences[output.sequence_id]
            seq.outputs.extend(output.token_ids)
            if output.token_ids:
                assert seq.num_computed == len(self.tokens(seq)) - 1
        return result

    def release(self, sequence_id: int) -> None:
        seq = self.sequences[sequence_id]
        self.free_blocks.extend(reversed(seq.blocks))
        seq.blocks, seq.known, seq.num_blocks_sent = [], False, 0


def test_greedy_batch_with_chunks_joins_leaves_and_swap_matches_transformers(
    model_dir: Path, executor_address: str
) -> None:
    with StepStream(executor_address) as stream:
        description = stream.describe()
        assert description.cache.block_size == BLOCK_SIZE
        assert description.cache.num_device_blocks == 64
        prompts = make_prompts(description.model.vocab_size)
        driver = HandDriver(stream, num_blocks=64, chunk_size=16)
        join_at = {i: (0 if i < 4 else 2 if i < 7 else 4) for i in range(len(prompts))}
        active: list[int] = []
        finished_now: list[int] = []
        swapped: dict[int, list[int]] = {}
        swap_victim, swapped_at = 1, None
        for step in range(60):
            for i, at in join_at.items():
                if at == step:
                    driver.sequences[i] = HandSequence(prompt=prompts[i])
                    active.append(i)
            preempted, swap_out, swap_in = (), BlockPairs(), BlockPairs()
            victim = driver.sequences.get(swap_victim)
            if swapped_at is None and victim is not None and len(victim.outputs) == 5:
                # Swap the victim out to host blocks 0..k, free its device blocks for others.
                host = list(range(len(victim.blocks)))
                swap_out = BlockPairs(tuple(victim.blocks), tuple(host))
                swapped[swap_victim] = host
                preempted = (swap_victim,)
                active.remove(swap_victim)
                computed = victim.num_computed
                driver.release(swap_victim)
                victim.num_computed = computed
                swapped_at = step
            elif swapped_at is not None and step == swapped_at + 2 and swap_victim in swapped:
                host = swapped.pop(swap_victim)
                driver._grow(victim, len(driver.tokens(victim)))
                swap_in = BlockPairs(tuple(host), tuple(victim.blocks[: len(host)]))
                active.append(swap_victim)
            if not active and not finished_now:
                break
            driver.step(active, finished=tuple(finished_now), preempted=preempted,
                        swap_out=swap_out, swap_in=swap_in)
            finished_now = [i for i in active if len(driver.sequences[i].outputs) >= NUM_NEW_TOKENS]
            for i in finished_now:
                active.remove(i)
                driver.release(i)
        assert swapped_at is not None
        assert sorted(driver.free_blocks) == list(range(64))
        for i, prompt in enumerate(prompts):
            got = driver.sequences[i].outputs[:NUM_NEW_TOKENS]
            assert got == hf_greedy(model_dir, prompt, NUM_NEW_TOKENS), f"sequence {i} (prompt {len(prompt)})"


def _new(sequence_id: int, tokens: list[int], blocks: tuple[int, ...], scheduled: int | None = None) -> NewSequence:
    return NewSequence(
        sequence_id=SequenceId(sequence_id), token_ids=tuple(tokens), num_prompt_tokens=len(tokens),
        num_computed_tokens=0, block_ids=blocks,
        num_scheduled_tokens=len(tokens) if scheduled is None else scheduled,
    )


def test_bad_plans_are_refused_and_the_executor_keeps_serving(model_dir: Path, executor_address: str) -> None:
    invalid, precondition = grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.FAILED_PRECONDITION.value[0]
    with StepStream(executor_address) as stream:
        prompt = make_prompts(stream.describe().model.vocab_size)[2]
        first = stream.step(StepPlan(step_id=1, new_sequences=(_new(7, prompt, (0, 1)),)))
        assert first.error is None and len(first.outputs[0].token_ids) == 1
        tokens = [first.outputs[0].token_ids[0]]
        bad_plans = {
            "unknown sequence": (StepPlan(step_id=2, continued_sequences=(ContinuedSequence(SequenceId(99), 1),)), precondition, "not held"),
            "unknown finish": (StepPlan(step_id=2, finished_sequence_ids=(98,)), precondition, "not held"),
            "block out of range": (StepPlan(step_id=2, new_sequences=(_new(8, prompt, (64,)),)), invalid, "out of range"),
            "too many tokens": (StepPlan(step_id=2, continued_sequences=(ContinuedSequence(SequenceId(7), 5),)), invalid, "too many tokens"),
            "too few blocks": (StepPlan(step_id=2, new_sequences=(_new(9, list(range(2, 40)), (1,)),)), invalid, "blocks hold"),
            "token out of vocabulary": (StepPlan(step_id=2, new_sequences=(_new(10, [10**6], (1,)),)), invalid, "vocabulary"),
            "duplicate new": (StepPlan(step_id=2, new_sequences=(_new(7, prompt, (1,)),)), precondition, "already held"),
            "stale step id": (StepPlan(step_id=1), invalid, "step_id"),
        }
        for name, (plan, code, words) in bad_plans.items():
            result = stream.step(plan)
            assert result.error is not None, name
            assert (result.error.code, words in result.error.message) == (code, True), (name, result.error)
            assert result.outputs == ()
        step_id = 2
        while len(tokens) < 6:
            result = stream.step(StepPlan(step_id=step_id, continued_sequences=(ContinuedSequence(SequenceId(7), 1),)))
            assert result.error is None
            tokens.extend(result.outputs[0].token_ids)
            step_id += 1
        assert tokens == hf_greedy(model_dir, prompt, 6)
