"""The simulated executor: real plan validation, the profile's step time, deterministic tokens, no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from executor_service.executor_config import ExecutorConfig
from executor_service.persistent_batch import BatchLimits
from executor_service.simulation.simulated_executor import SimulatedExecutor
from executor_service.simulation.simulated_runner import SimulatedRunner, simulated_next_token
from executor_service.simulation.step_time_profile import PROFILES_DIR, StepTimeModel, StepTimeProfile
from executor_service.tiny_tokenizer import EOS_TOKEN_ID, TINY_VOCAB_SIZE
from shared.step_plan import BlockPairs, ContinuedSequence, NewSequence, SamplingOptions, SequenceId, StepPlan

STEP_TIME = StepTimeModel(
    base_seconds=0.004, seconds_per_scheduled_token=1e-5, seconds_per_context_token=2e-7
)
LIMITS = BatchLimits(vocab_size=TINY_VOCAB_SIZE, block_size=16, num_device_blocks=64, num_host_blocks=8,
    max_model_len=512, max_num_batched_tokens=256, max_num_seqs=8, max_logprobs=5)
BYTES_PER_BLOCK = 1000


@pytest.fixture
def slept() -> list[float]:
    return []


@pytest.fixture
def runner(slept: list[float]) -> SimulatedRunner:
    return SimulatedRunner(STEP_TIME, LIMITS, BYTES_PER_BLOCK, 1e6, 2e6, sleep=slept.append)


def new(sequence_id: int, token_ids: list[int], num_scheduled: int, num_computed: int = 0,
        num_prompt: int | None = None, sampling: SamplingOptions = SamplingOptions()) -> NewSequence:
    num_blocks = -(-len(token_ids) // 16) + 1
    return NewSequence(SequenceId(sequence_id), tuple(token_ids), num_prompt or len(token_ids), num_computed,
        tuple(range(sequence_id * 8, sequence_id * 8 + num_blocks)), num_scheduled, sampling)


def reference(token_ids: list[int], num_new_tokens: int) -> list[int]:
    tokens = list(token_ids)
    for _ in range(num_new_tokens):
        tokens.append(simulated_next_token(tokens, TINY_VOCAB_SIZE))
    return tokens[len(token_ids):]


def test_forward_seconds_is_the_profile_formula_and_is_what_the_step_sleeps(runner, slept):
    prompt_a, prompt_b = list(range(10, 30)), list(range(40, 47))
    # a: a prefill chunk of 12 of its 20 tokens (no sample); b: its whole 7-token prompt.
    result = runner.execute(StepPlan(1, new_sequences=(new(1, prompt_a, 12), new(2, prompt_b, 7))))
    assert result.error is None
    assert result.timing.forward_seconds == STEP_TIME.forward_seconds(19, 12 + 7)
    assert result.timing.forward_seconds == pytest.approx(0.004 + 19e-5 + 19 * 2e-7)
    assert [o.token_ids for o in result.outputs] == [(), tuple(reference(prompt_b, 1))]
    # a finishes its prompt (8 tokens spanning 20), b decodes one token (spanning 8); a swap-out of 2 blocks.
    result = runner.execute(StepPlan(2, continued_sequences=(
        ContinuedSequence(SequenceId(1), 8), ContinuedSequence(SequenceId(2), 1)),
        swap_out=BlockPairs((0, 1), (0, 1))))
    assert result.timing.forward_seconds == STEP_TIME.forward_seconds(9, 20 + 8)
    assert result.timing.block_ops_seconds == 2 * BYTES_PER_BLOCK / 1e6
    swap_seconds = 2 * BYTES_PER_BLOCK / 1e6
    assert slept == [STEP_TIME.forward_seconds(19, 19), swap_seconds + STEP_TIME.forward_seconds(9, 28)]
    assert result.timing.num_tokens == 9
    assert [o.token_ids for o in result.outputs] == [
        tuple(reference(prompt_a, 1)), (reference(prompt_b, 2)[1],)
    ]


def test_an_empty_plan_takes_no_time(runner, slept):
    result = runner.execute(StepPlan(1))
    assert result.error is None and result.timing.forward_seconds == 0.0 and slept == [0.0]


def test_tokens_depend_only_on_the_tokens_so_far_so_recompute_continues_the_same_sequence(runner):
    prompt = [1, 2, 3, 4, 5]
    produced: list[int] = []
    result = runner.execute(StepPlan(1, new_sequences=(new(1, prompt, 5),)))
    produced += result.outputs[0].token_ids
    for step_id in range(2, 6):
        plan = StepPlan(step_id, continued_sequences=(ContinuedSequence(SequenceId(1), 1),))
        produced += runner.execute(plan).outputs[0].token_ids
    assert produced == reference(prompt, 5)
    # Preempted after 3 output tokens, resumed by recompute from prompt + those tokens (as the scheduler
    # does).
    resumed = new(1, prompt + produced[:3], 8, num_prompt=5)
    result = runner.execute(StepPlan(6, preempted_sequence_ids=(1,), new_sequences=(resumed,)))
    assert result.outputs[0].token_ids == (produced[3],)
    assert len(set(reference(list(range(100)), 50))) > 20  # not a constant


def test_min_tokens_keeps_banned_tokens_out_and_logprobs_put_all_mass_on_the_token(runner):
    prompt = [7] * 9
    eos_first = next(p for p in ([a, b] for a in range(256) for b in range(256))
        if simulated_next_token(p, TINY_VOCAB_SIZE) == 9)
    sampling = SamplingOptions(min_tokens=1, banned_token_ids_before_min_tokens=(9,), logprobs=3)
    result = runner.execute(StepPlan(1, new_sequences=(new(1, eos_first, len(eos_first), sampling=sampling),
        new(2, prompt, 9, sampling=SamplingOptions(logprobs=0)))))
    banned_output, plain = result.outputs
    assert banned_output.token_ids == (10,)
    assert banned_output.logprobs == (0.0,)
    assert banned_output.top_logprobs == (((10, 0.0), (11, -100.0), (12, -100.0)),)
    assert plain.logprobs == (0.0,) and plain.top_logprobs == ()


def test_plans_are_validated_like_the_real_executor_and_a_rejected_plan_changes_nothing(runner, slept):
    result = runner.execute(StepPlan(1, continued_sequences=(ContinuedSequence(SequenceId(3), 1),)))
    assert result.error is not None and result.error.code == 9  # FAILED_PRECONDITION
    assert "not held by this executor" in result.error.message
    result = runner.execute(StepPlan(2, new_sequences=(new(1, [TINY_VOCAB_SIZE], 1),)))
    assert result.error is not None and result.error.code == 3
    assert "outside the vocabulary" in result.error.message
    assert slept == [] and runner.batch.sequences == {}


@pytest.mark.parametrize("name", sorted(p.stem for p in PROFILES_DIR.glob("*.json")))
def test_every_profile_loads_and_describes_itself_like_a_real_executor(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEWIRE_CACHE", str(tmp_path))
    profile = StepTimeProfile.load(name)
    executor = SimulatedExecutor.load(ExecutorConfig(model_dir="", simulate=name, block_size=16))
    info = executor.info
    assert info.model_config.name == f"simulated:{name}"
    model = info.model_config
    assert (model.vocab_size, model.eos_token_ids) == (TINY_VOCAB_SIZE, (EOS_TOKEN_ID,))
    assert info.model_dir == str(tmp_path / "simulated-tokenizer-tiny")
    assert (tmp_path / "simulated-tokenizer-tiny" / "tokenizer.json").is_file()
    assert info.bytes_per_block == 16 * profile.kv_bytes_per_token
    assert info.num_device_blocks == profile.kv_cache_bytes // info.bytes_per_block
    assert info.num_host_blocks == 1024**3 // info.bytes_per_block
    assert info.max_model_len == profile.max_model_len
    assert info.speeds.prefill_tokens_per_second == 512 / profile.step_time.forward_seconds(512, 512)
    assert info.ops_backend == "simulated" and info.device_name.startswith("simulated ")


def test_the_h100_profile_models_a_memory_bound_decode_of_about_six_ms():
    step = StepTimeProfile.load("h100_llama3_8b").step_time
    assert step.forward_seconds(1, 1) == pytest.approx(0.006, rel=0.01)
    assert step.forward_seconds(256, 256 * 1024) == pytest.approx(0.0258, rel=0.01)


def test_an_unknown_profile_names_the_known_ones():
    with pytest.raises(ValueError, match=r"no such profile; known: .*h100_llama3_8b"):
        StepTimeProfile.load("a100_nothing")


def test_the_simulated_executor_never_imports_torch(tmp_path):
    code = (
        "import sys; from executor_service.server import executor_loader; "
        "from executor_service.executor_config import ExecutorConfig; "
        "executor_loader(ExecutorConfig(model_dir='', simulate='cpu_tiny'))(ExecutorConfig(model_dir='', "
        "simulate='cpu_tiny')); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
        env={"PAGEWIRE_CACHE": str(tmp_path), "PATH": ""})
    assert out.stdout.splitlines()[-1] == "False"


def test_the_cli_refuses_a_model_for_a_simulated_executor(capsys):
    from pagewire.cli import main

    assert main(["executor", "--simulate", "cpu_tiny", "--model", "/models/x"]) == 2
    assert "--simulate serves no model: leave out --model" in capsys.readouterr().err
