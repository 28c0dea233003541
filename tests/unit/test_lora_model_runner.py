"""Multi-LoRA through ModelRunner.execute equals PEFT token for token; LoRA plans that cannot run are refused."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from executor_service.executor import Executor
from executor_service.executor_config import ExecutorConfig
from executor_service.model_runner import ModelRunner
from executor_service.servicer import describe_to_pb
from executor_service.tiny_model import create_tiny_model
from shared.step_plan import AdapterLoad, ContinuedSequence, NewSequence, SequenceId, StepPlan, StepResult
from tests.helpers.peft_adapters import make_peft_adapter, peft_greedy

BLOCK_SIZE = 8
MAX_NEW_TOKENS = 8
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    "qv_r4": dict(rank=4, target_modules=("q_proj", "v_proj"), lora_alpha=8, seed=11),
    "all_r8_rslora": dict(rank=8, target_modules=ALL_MODULES, lora_alpha=16, use_rslora=True, seed=12),
    "mlp_o_r16": dict(rank=16, target_modules=("o_proj", "gate_proj", "up_proj", "down_proj"), lora_alpha=32, seed=13),
}
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("base"), seed=0)


@pytest.fixture(scope="module")
def adapter_dirs(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_peft_adapter(base_dir, root / name, **options) for name, options in ADAPTERS.items()}


def load_executor(base_dir: Path, **lora_options: object) -> Executor:
    config = ExecutorConfig(
        model_dir=str(base_dir), block_size=BLOCK_SIZE, num_device_blocks_override=96, swap_space_gib=0.001,
        seed=0, **lora_options,
    )
    return Executor.load(config)


@pytest.fixture(scope="module")
def lora_executor(base_dir: Path) -> Executor:
    return load_executor(base_dir, enable_lora=True, max_loras=4, max_lora_rank=16)


@pytest.fixture(scope="module")
def plain_executor(base_dir: Path) -> Executor:
    return load_executor(base_dir)


@pytest.fixture
def runner(lora_executor: Executor) -> ModelRunner:
    lora_executor.runner.reset()
    return lora_executor.runner


@dataclass
class Request:
    prompt: list[int]
    lora_slot: int | None
    # Tokens of the prompt computed by each step (chunked prefill); by default the whole prompt at once.
    prefill_chunks: tuple[int, ...] = ()
    outputs: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    is_sent: bool = False


class Driver:
    """A minimal scheduler: shuffled blocks, explicit prefill chunks, greedy decode to MAX_NEW_TOKENS."""

    def __init__(self, runner: ModelRunner, num_blocks: int) -> None:
        self.runner = runner
        self.free_blocks = list(range(num_blocks))
        random.Random(3).shuffle(self.free_blocks)
        self.step_id = 0

    def step(self, plan_fields: dict[str, object], requests: dict[int, Request]) -> StepResult:
        new, continued = [], []
        for sequence_id, request in requests.items():
            tokens = request.prompt + request.outputs
            if len(request.outputs) >= MAX_NEW_TOKENS:
                continue
            chunk_ends = [c for c in itertools.accumulate(request.prefill_chunks) if c > request.num_computed]
            end = chunk_ends[0] if chunk_ends else len(tokens)
            num_tokens = end - request.num_computed
            added = [self.free_blocks.pop() for _ in range(-(-end // BLOCK_SIZE) - len(request.block_ids))]
            request.block_ids += added
            if request.is_sent:
                continued.append(ContinuedSequence(SequenceId(sequence_id), num_tokens, tuple(added)))
            else:
                request.is_sent = True
                new.append(NewSequence(
                    sequence_id=SequenceId(sequence_id), token_ids=tuple(tokens),
                    num_prompt_tokens=len(request.prompt), num_computed_tokens=0,
                    block_ids=tuple(request.block_ids), num_scheduled_tokens=num_tokens,
                    lora_slot=request.lora_slot,
                ))
            request.num_computed = end
        self.step_id += 1
        result = self.runner.execute(StepPlan(self.step_id, tuple(new), tuple(continued), **plan_fields))
        assert result.error is None, result.error
        for output in result.outputs:
            requests[output.sequence_id].outputs += output.token_ids
        return result

    def generate(self, requests: dict[int, Request], adapter_loads: tuple[AdapterLoad, ...]) -> None:
        """Runs `requests` to MAX_NEW_TOKENS each, loading `adapter_loads` in the first plan."""
        plan_fields: dict[str, object] = {"adapter_loads": adapter_loads}
        while any(len(r.outputs) < MAX_NEW_TOKENS for r in requests.values()):
            self.step(plan_fields, requests)
            plan_fields = {}
        self.step_id += 1
        finished = tuple(requests)
        result = self.runner.execute(StepPlan(self.step_id, finished_sequence_ids=finished))
        assert result.error is None, result.error


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_mixed_batch_of_base_and_three_adapters_equals_peft(runner, base_dir, adapter_dirs):
    slots = {"qv_r4": 0, "all_r8_rslora": 1, "mlp_o_r16": 2}
    names: dict[int, str | None] = {1: None, 2: "qv_r4", 3: "qv_r4", 4: None, 5: "all_r8_rslora", 6: "mlp_o_r16"}
    requests = {
        1: Request(prompt(7, 1), None),
        2: Request(prompt(11, 2), 0),
        3: Request(prompt(5, 3), 0),
        4: Request(prompt(9, 4), None),
        5: Request(prompt(20, 5), 1, prefill_chunks=(12, 8)),
        6: Request(prompt(6, 6), 2),
    }
    loads = tuple(AdapterLoad(slot, name, str(adapter_dirs[name])) for name, slot in slots.items())
    Driver(runner, 96).generate(requests, loads)
    runner.lora.check_integrity()
    got = {i: r.outputs for i, r in requests.items()}
    expected = {
        i: peft_greedy(base_dir, None if names[i] is None else adapter_dirs[names[i]], r.prompt, MAX_NEW_TOKENS)
        for i, r in requests.items()
    }
    assert got == expected
    # The adapters change the tokens: the same prompts through the base model differ.
    base_only = {i: peft_greedy(base_dir, None, requests[i].prompt, MAX_NEW_TOKENS) for i in (2, 5, 6)}
    assert all(base_only[i] != expected[i] for i in base_only)


def test_slot_reloaded_with_another_adapter_serves_the_new_one(runner, base_dir, adapter_dirs):
    driver = Driver(runner, 96)
    first = {1: Request(prompt(9, 7), 0)}
    driver.generate(first, (AdapterLoad(0, "qv_r4", str(adapter_dirs["qv_r4"])),))
    num_reads = runner.lora.host_cache.num_reads
    second = {2: Request(prompt(9, 7), 0), 3: Request(prompt(4, 8), 3)}
    driver.generate(second, (
        AdapterLoad(0, "mlp_o_r16", str(adapter_dirs["mlp_o_r16"])),
        AdapterLoad(3, "qv_r4", str(adapter_dirs["qv_r4"])),
    ))
    runner.lora.check_integrity()
    assert runner.lora.host_cache.num_reads == num_reads  # both were cached by now: no file read
    assert first[1].outputs == peft_greedy(base_dir, adapter_dirs["qv_r4"], first[1].prompt, MAX_NEW_TOKENS)
    assert second[2].outputs == peft_greedy(base_dir, adapter_dirs["mlp_o_r16"], second[2].prompt, MAX_NEW_TOKENS)
    assert second[3].outputs == peft_greedy(base_dir, adapter_dirs["qv_r4"], second[3].prompt, MAX_NEW_TOKENS)


def test_base_only_step_does_no_lora_work(runner, adapter_dirs):
    driver = Driver(runner, 96)
    driver.step({"adapter_loads": (AdapterLoad(0, "qv_r4", str(adapter_dirs["qv_r4"])),)}, {1: Request(prompt(5, 1), None)})
    lora_a = runner.lora.slots.lora_a[0]["q_proj"]
    version = lora_a._version
    assert runner.lora.batch(None, 5) is None
    assert lora_a._version == version


def new_sequence(sequence_id: int, lora_slot: int | None, block_id: int = 0) -> NewSequence:
    return NewSequence(SequenceId(sequence_id), (5, 6, 7), 3, 0, (block_id,), 3, lora_slot=lora_slot)


def assert_refused(runner: ModelRunner, plan: StepPlan, code: int, message: str) -> None:
    result = runner.execute(plan)
    assert result.error is not None and result.error.code == code, result
    assert message in result.error.message
    assert result.outputs == ()


def test_bad_slots_and_loads_are_refused_and_change_nothing(runner, adapter_dirs):
    path = str(adapter_dirs["qv_r4"])
    assert_refused(runner, StepPlan(1, (new_sequence(1, 4),)), INVALID_ARGUMENT,
        "sequence 1: lora_slot 4 out of range [0, 4)")
    assert_refused(runner, StepPlan(1, adapter_loads=(AdapterLoad(7, "a", path),)), INVALID_ARGUMENT,
        "adapter load 'a' into slot 7 out of range [0, 4)")
    assert_refused(runner, StepPlan(1, adapter_loads=(AdapterLoad(1, "a", path), AdapterLoad(1, "b", path))),
        INVALID_ARGUMENT, "two adapter loads into LoRA slot 1 in one step")
    assert_refused(runner, StepPlan(1, (new_sequence(1, 2),)), FAILED_PRECONDITION,
        "LoRA slot 2 holds no adapter")
    assert_refused(runner, StepPlan(1, (new_sequence(1, 0),), adapter_loads=(AdapterLoad(0, "pw", "/etc/passwd"),)),
        INVALID_ARGUMENT, "adapter 'pw' cannot be loaded: LoRA adapter path '/etc/passwd' is not a directory")
    assert runner.batch.sequences == {} and runner.lora.slots.contents == [None] * 4
    ok = runner.execute(StepPlan(1, (new_sequence(1, 0),), adapter_loads=(AdapterLoad(0, "a", path),)))
    assert ok.error is None and len(ok.outputs[0].token_ids) == 1
    assert_refused(runner, StepPlan(2, adapter_loads=(AdapterLoad(0, "b", path),)), INVALID_ARGUMENT,
        "adapter load into LoRA slot 0 while sequence 1 uses it")
    swapped = runner.execute(StepPlan(2, finished_sequence_ids=(1,), adapter_loads=(AdapterLoad(0, "b", path),)))
    assert swapped.error is None
    assert runner.lora.slots.contents[0] is not None and runner.lora.slots.contents[0].adapter_name == "b"
    runner.lora.check_integrity()


def test_reset_empties_the_slots(runner, adapter_dirs):
    runner.execute(StepPlan(1, adapter_loads=(AdapterLoad(3, "a", str(adapter_dirs["qv_r4"])),)))
    assert runner.lora.slots.contents[3] is not None
    runner.reset()
    assert runner.lora.slots.contents == [None] * 4
    runner.lora.check_integrity()


def test_lora_off_refuses_lora_plans(plain_executor, adapter_dirs):
    runner = plain_executor.runner
    runner.reset()
    assert runner.lora is None
    assert_refused(runner, StepPlan(1, adapter_loads=(AdapterLoad(0, "a", str(adapter_dirs["qv_r4"])),)),
        INVALID_ARGUMENT, "LoRA is off on this executor (start it with --enable-lora)")
    assert_refused(runner, StepPlan(1, (new_sequence(1, 0),)), INVALID_ARGUMENT,
        "sequence 1: lora_slot 0: LoRA is off on this executor")
    assert runner.batch.sequences == {}
    assert runner.execute(StepPlan(1, (new_sequence(1, None),))).error is None


def test_describe_reports_lora_limits(lora_executor, plain_executor):
    described = describe_to_pb(lora_executor)
    assert (described.max_loras, described.max_lora_rank, described.model.intermediate_size) == (4, 16, 176)
    plain = describe_to_pb(plain_executor)
    assert (plain.max_loras, plain.max_lora_rank, plain.model.intermediate_size) == (0, 0, 176)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_lora_rank": 0}, r"--max-lora-rank must be in \[1, 256\], got 0"),
        ({"max_lora_rank": 257}, r"--max-lora-rank must be in \[1, 256\], got 257"),
        ({"max_loras": 0}, r"--max-loras must be at least 1, got 0"),
        ({"max_cpu_loras": 0}, r"--max-cpu-loras must be at least 1, got 0"),
    ],
)
def test_lora_settings_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        ExecutorConfig(model_dir="unused", enable_lora=True, **options)
