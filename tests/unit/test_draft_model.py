"""Speculative decoding with a draft model: `pagewire create-draft-model` writes a layer-truncated copy
that transformers loads and that computes what the original's first layers compute; the executor's
draft model proposes k drafts per step from its own KV pool under the target's block ids, and the
tokens stay the target's greedy ones whatever the draft proposes (a 1-layer draft, the target itself),
through chunked prefill, a prefix hit and swap out / in (both pools move). The draft computes only for
sequences that draft: one that starts late catches up and proposes what the draft model does."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from executor_service.executor import Executor
from executor_service.executor_config import ExecutorConfig
from executor_service.model_runner import ModelRunner
from executor_service.model.truncated_checkpoint import write_truncated_checkpoint
from executor_service.tiny_model import create_tiny_model, random_tiny_weights
from pagewire.cli import main
from shared.step_plan import BlockPairs, ContinuedSequence, NewSequence, SequenceId, StepPlan
from tests.unit.test_gguf_checkpoint import CONFIG as GGUF_CONFIG
from tests.unit.test_gguf_checkpoint import write_gguf

BLOCK_SIZE = 8
BLOCKS_PER_SEQUENCE = 8
NUM_DRAFTS = 3
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
PROMPTS = {
    1: [5, 17, 33, 2, 91, 7, 7, 40, 12, 19, 3],
    2: [5, 17, 33, 2, 91, 7, 7, 40, 61, 62],  # its first block is sequence 1's: a prefix hit
    3: [200, 1, 44, 9, 9, 9, 120, 3, 77, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24],  # chunked prefill
}
MAX_NEW_TOKENS = 20


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("draft_model")
    target = create_tiny_model(root / "target", seed=4)
    return {
        "target": target,
        "self": write_truncated_checkpoint(target, root / "self", 4),
        "one_layer": write_truncated_checkpoint(target, root / "one_layer", 1),
    }


def _truncated_transformers(model_dir: Path, num_layers: int) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.model.layers = model.model.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    return model.eval()


def test_create_draft_model_writes_the_first_layers_transformers_loads(models: dict[str, Path], tmp_path: Path) -> None:
    assert main(["create-draft-model", str(models["target"]), str(tmp_path / "draft"), "--num-layers", "2"]) == 0
    draft_dir = tmp_path / "draft"
    assert json.loads((draft_dir / "config.json").read_text())["num_hidden_layers"] == 2
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in draft_dir.iterdir()}
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    assert len(draft.model.layers) == 2
    reference = _truncated_transformers(models["target"], 2)
    input_ids = torch.tensor([PROMPTS[3]])
    with torch.no_grad():
        assert torch.equal(draft(input_ids).logits, reference(input_ids).logits)


def test_create_draft_model_from_gguf_equals_the_gguf_loaded_by_transformers(tmp_path: Path) -> None:
    (tmp_path / "source").mkdir()
    gguf_path = write_gguf(tmp_path / "source" / "tiny.gguf", random_tiny_weights(GGUF_CONFIG, seed=3))
    draft_dir = write_truncated_checkpoint(gguf_path, tmp_path / "draft", 1)
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
    reference.model.layers = reference.model.layers[:1]
    input_ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        torch.testing.assert_close(draft(input_ids).logits, reference.eval()(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_create_draft_model_refuses_a_layer_count_out_of_range(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--num-layers must be in 1..4"):
        write_truncated_checkpoint(models["target"], tmp_path / "x", 5)


@pytest.fixture(scope="module")
def reference(models: dict[str, Path]) -> dict[int, list[int]]:
    model = AutoModelForCausalLM.from_pretrained(models["target"], dtype=torch.float32)
    model.generation_config.eos_token_id = None
    tokens = {}
    for sequence_id, prompt in PROMPTS.items():
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW_TOKENS,
                             do_sample=False, pad_token_id=0)
        tokens[sequence_id] = out[0, len(prompt):].tolist()
    return tokens


def _executor(target: Path, draft: Path | None, max_num_batched_tokens: int = 8192) -> Executor:
    spec = None if draft is None else json.dumps(
        {"method": "draft_model", "model": str(draft), "num_speculative_tokens": NUM_DRAFTS}
    )
    return Executor.load(ExecutorConfig(model_dir=str(target), block_size=BLOCK_SIZE, num_device_blocks_override=40,
                                        swap_space_gib=0.001, seed=0, speculative_config=spec,
                                        max_num_batched_tokens=max_num_batched_tokens))


@pytest.fixture(scope="module", params=["self", "one_layer"])
def drafted(request: pytest.FixtureRequest, models: dict[str, Path]) -> tuple[str, ModelRunner]:
    return request.param, _executor(models["target"], models[request.param]).runner


def _blocks(sequence_id: int) -> tuple[int, ...]:
    first = (sequence_id - 1) * BLOCKS_PER_SEQUENCE
    return tuple(range(first, first + BLOCKS_PER_SEQUENCE))


class Driver:
    """Sends plans to one runner and keeps what each sequence produced, what the draft proposed from
    which context, and how its drafts fared."""

    def __init__(self, runner: ModelRunner) -> None:
        runner.reset()
        self.runner = runner
        self.step_id = 0
        self.produced: dict[int, list[int]] = {}
        self.proposals: list[tuple[int, list[int], list[int]]] = []  # (sequence id, context, drafts)
        self.num_drafted = 0
        self.num_accepted = 0

    def execute(self, **plan: object) -> None:
        self.step_id += 1
        sequences = self.runner.batch.sequences
        draft_counts = {sid: state.num_draft_computed_tokens for sid, state in sequences.items()}
        result = self.runner.execute(StepPlan(step_id=self.step_id, **plan))
        assert result.error is None, result.error
        for output in result.outputs:
            tokens = list(output.token_ids)
            if output.draft_token_ids:
                context = [*PROMPTS[output.sequence_id], *self.produced[output.sequence_id]]
                self.proposals.append((output.sequence_id, context, list(output.draft_token_ids)))
                num_accepted = len(tokens) - 1
                assert list(output.draft_token_ids[:num_accepted]) == tokens[:num_accepted]
                self.num_drafted += len(output.draft_token_ids)
                self.num_accepted += num_accepted
            self.produced.setdefault(output.sequence_id, []).extend(tokens)
        continued = plan.get("continued_sequences", ())
        drafting = {c.sequence_id for c in continued if c.num_model_drafts}  # type: ignore[union-attr]
        for sid, state in sequences.items():
            # A drafting sequence's draft pool holds exactly the target's tokens; any other's is untouched
            # (0 for a sequence the executor just received, prefix hit or swap-in alike).
            expected = state.num_computed_tokens if sid in drafting else draft_counts.get(sid, 0)
            assert state.num_draft_computed_tokens == expected, (sid, state.num_draft_computed_tokens, expected)

    def decode(self, sequence_ids: list[int], drafting: set[int] | None = None) -> None:
        """One step: each sequence in `drafting` (None: all) decodes with as many model drafts as its end
        leaves (up to k), the others with none."""
        continued = []
        for sid in sequence_ids:
            k = min(NUM_DRAFTS, MAX_NEW_TOKENS - len(self.produced[sid]) - 1)
            if drafting is not None and sid not in drafting:
                k = 0
            continued.append(ContinuedSequence(SequenceId(sid), 1 + k, (), (), k))
        self.execute(continued_sequences=tuple(continued))

    def live(self) -> list[int]:
        return [sid for sid, tokens in self.produced.items() if len(tokens) < MAX_NEW_TOKENS]


def test_model_drafts_keep_the_targets_tokens_through_chunked_prefill_and_a_prefix_hit(
    drafted: tuple[str, ModelRunner], reference: dict[int, list[int]]
) -> None:
    name, runner = drafted
    driver = Driver(runner)
    p1, p3 = PROMPTS[1], PROMPTS[3]
    driver.execute(new_sequences=(
        NewSequence(SequenceId(1), tuple(p1), len(p1), 0, _blocks(1), len(p1)),
        NewSequence(SequenceId(3), tuple(p3), len(p3), 0, _blocks(3), 12),  # first chunk of 12
    ))
    # Sequence 2 reuses sequence 1's first block (8 computed tokens), as a prefix-cache hit does.
    p2 = PROMPTS[2]
    driver.execute(
        new_sequences=(NewSequence(SequenceId(2), tuple(p2), len(p2), 8, (_blocks(1)[0], *_blocks(2)[1:]), 2),),
        continued_sequences=(ContinuedSequence(SequenceId(3), len(p3) - 12),
                             ContinuedSequence(SequenceId(1), 1 + NUM_DRAFTS, (), (), NUM_DRAFTS)),
    )
    while driver.live():
        driver.decode(driver.live())
    assert driver.produced == reference
    assert driver.num_drafted > 0
    if name == "self":  # the target as its own draft is always right
        assert driver.num_accepted == driver.num_drafted
    else:  # one layer of four is mostly wrong
        assert driver.num_accepted < driver.num_drafted


def test_swap_moves_both_pools(drafted: tuple[str, ModelRunner], reference: dict[int, list[int]]) -> None:
    name, runner = drafted
    driver = Driver(runner)
    p1 = PROMPTS[1]
    driver.execute(new_sequences=(NewSequence(SequenceId(1), tuple(p1), len(p1), 0, _blocks(1), len(p1)),))
    for _ in range(2):
        driver.decode([1])
    state = runner.batch.sequences[SequenceId(1)]
    num_computed, token_ids = state.num_computed_tokens, tuple(state.token_ids)
    num_blocks = -(-num_computed // BLOCK_SIZE)
    # Out to host blocks 0.., then back into other device blocks, whose pools held nothing of it.
    driver.execute(preempted_sequence_ids=(1,), swap_out=BlockPairs(_blocks(1)[:num_blocks], tuple(range(num_blocks))))
    fresh = _blocks(4)
    driver.execute(
        swap_in=BlockPairs(tuple(range(num_blocks)), fresh[:num_blocks]),
        new_sequences=(NewSequence(SequenceId(1), token_ids, len(p1), num_computed, fresh,
                                   len(token_ids) - num_computed),),
    )
    while driver.live():
        driver.decode(driver.live())
    assert driver.produced[1] == reference[1]
    if name == "self":
        assert driver.num_accepted == driver.num_drafted > 0


@pytest.mark.parametrize("name", ["self", "one_layer"])
def test_a_sequence_that_drafts_nothing_costs_the_draft_nothing_and_catches_up_when_it_drafts(
    name: str, models: dict[str, Path], reference: dict[int, list[int]]
) -> None:
    """A policy that drafts for sequence 1 only: the draft computes nothing for sequence 3 (its count
    stays 0). When 3 starts drafting, its catch-up (27 tokens, more than one draft forward's 16: two
    forwards) makes its drafts the draft model's own greedy continuation of the whole context, as
    transformers computes it; the self-draft's are the target's tokens, all accepted."""
    driver = Driver(_executor(models["target"], models[name], max_num_batched_tokens=16).runner)
    p1, p3 = PROMPTS[1], PROMPTS[3]
    driver.execute(new_sequences=(NewSequence(SequenceId(1), tuple(p1), len(p1), 0, _blocks(1), len(p1)),))
    driver.execute(
        new_sequences=(NewSequence(SequenceId(3), tuple(p3), len(p3), 0, _blocks(3), 12),),
        continued_sequences=(ContinuedSequence(SequenceId(1), 1 + NUM_DRAFTS, (), (), NUM_DRAFTS),),
    )
    driver.execute(continued_sequences=(ContinuedSequence(SequenceId(3), len(p3) - 12),
                                        ContinuedSequence(SequenceId(1), 1 + NUM_DRAFTS, (), (), NUM_DRAFTS)))
    while len(driver.produced[3]) < 8:
        driver.decode(driver.live(), drafting={1})
    sequences = driver.runner.batch.sequences
    assert sequences[SequenceId(3)].num_draft_computed_tokens == 0
    assert sequences[SequenceId(3)].num_computed_tokens == len(p3) + 8 - 1
    assert {sid for sid, _, _ in driver.proposals} == {1}
    while driver.live():
        driver.decode(driver.live())
    assert driver.produced == {1: reference[1], 3: reference[3]}
    late = [(context, drafts) for sid, context, drafts in driver.proposals if sid == 3]
    assert late and len(late[0][0]) == len(p3) + 8
    draft_model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float32).eval()
    draft_model.generation_config.eos_token_id = None
    for _, context, drafts in driver.proposals:
        ids = torch.tensor([context])
        expected = draft_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(drafts),
                                        do_sample=False, pad_token_id=0)[0, len(context):].tolist()
        assert drafts == expected
    if name == "self":
        assert all(drafts == reference[3][len(context) - len(p3):][: len(drafts)] for context, drafts in late)
        assert driver.num_accepted == driver.num_drafted


def test_a_draft_with_another_vocabulary_is_refused_at_load(models: dict[str, Path], tmp_path: Path) -> None:
    draft = write_truncated_checkpoint(models["target"], tmp_path / "other_vocab", 1)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 1}))
    with pytest.raises(ValueError, match="must share the target's tokenizer"):
        _executor(models["target"], draft)


def test_model_drafts_are_refused_without_a_draft_model(models: dict[str, Path]) -> None:
    runner = _executor(models["target"], None).runner
    p1 = PROMPTS[1]
    assert runner.execute(StepPlan(step_id=1, new_sequences=(
        NewSequence(SequenceId(1), tuple(p1), len(p1), 0, _blocks(1), len(p1)),
    ))).error is None
    result = runner.execute(StepPlan(step_id=2, continued_sequences=(
        ContinuedSequence(SequenceId(1), 3, (), (), 2),
    )))
    assert result.error is not None and result.error.code == INVALID_ARGUMENT
    assert "without a draft model" in result.error.message
