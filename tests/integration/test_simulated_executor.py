"""Today's scheduler serving from a simulated executor process: exact deterministic tokens for a
concurrent batch, and the reported forward time equal to the profile's model for a hand-made plan."""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from executor_service.simulation.simulated_runner import simulated_next_token
from executor_service.simulation.step_time_profile import StepTimeProfile
from executor_service.tiny_tokenizer import TINY_VOCAB_SIZE
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from shared.step_plan import ContinuedSequence, NewSequence, SequenceId, StepPlan
from tests.helpers.processes import free_port, running
from tests.helpers.step_stream import StepStream

PROFILE = "cpu_tiny"
NUM_REQUESTS = 24
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def executor_address(cache_dir: Path) -> str:
    port = free_port()
    address = f"127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PAGEWIRE_CACHE", str(cache_dir))
        # Few blocks, so the batch below also exercises preemption by recompute.
        # No lease after a stream ends: the second test drives the stream itself once the scheduler is gone.
        with running(["executor", "--simulate", PROFILE, "--port", str(port),
                      "--num-gpu-blocks-override", "40", "--executor-lease-seconds", "0"],
                     address):
            yield address


def reference(prompt: list[int], num_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(simulated_next_token(tokens, TINY_VOCAB_SIZE))
    return tokens[len(prompt):]


def test_a_scheduler_serves_a_concurrent_batch_with_the_deterministic_tokens(executor_address: str) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    prompts = [[(7 * i + t) % 256 for t in range(10 + 3 * i)] for i in range(NUM_REQUESTS)]

    def generate(prompt: list[int]) -> list[int]:
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
            sampling=pb.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
        with grpc.insecure_channel(address) as channel:
            responses = list(pb_grpc.GenerationStub(channel).Generate(request, timeout=60))
        assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        return [t for r in responses for t in r.token_ids]

    args = ["scheduler", "--executor", executor_address, "--port", str(port), "--http-port", "0",
            "--max-model-len", "256"]
    with running(args, address, service="pagewire.v1.Generation"):
        with ThreadPoolExecutor(NUM_REQUESTS) as pool:
            outputs = list(pool.map(generate, prompts))
        with grpc.insecure_channel(address) as channel:
            info = pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert outputs == [reference(p, MAX_TOKENS) for p in prompts]
    assert info.model_name == f"simulated:{PROFILE}"
    assert info.num_free_device_blocks == info.num_device_blocks == 40


def test_the_reported_forward_time_is_the_profiles_model(executor_address: str) -> None:
    step_time = StepTimeProfile.load(PROFILE).step_time
    with StepStream(executor_address) as stream:
        description = stream.describe()
        assert description.model.name == f"simulated:{PROFILE}"
        assert description.ops_backend == "simulated"
        first = stream.step(StepPlan(1, new_sequences=(
            NewSequence(SequenceId(1), tuple(range(30)), 30, 0, (0, 1), 30),
            NewSequence(SequenceId(2), tuple(range(50, 55)), 5, 0, (2,), 5),
        )))
        second = stream.step(StepPlan(2, continued_sequences=(
            ContinuedSequence(SequenceId(1), 1), ContinuedSequence(SequenceId(2), 1))))
    assert first.error is None and second.error is None
    assert first.timing.forward_seconds == pytest.approx(step_time.forward_seconds(35, 35), rel=1e-12)
    assert second.timing.forward_seconds == pytest.approx(step_time.forward_seconds(2, 31 + 6), rel=1e-12)
    # The step really took that long (it sleeps), and the wall time is never below the model.
    assert second.timing.total_seconds >= second.timing.forward_seconds
    assert [o.token_ids for o in first.outputs] == [tuple(reference(list(range(30)), 1)),
                                                    tuple(reference(list(range(50, 55)), 1))]


def test_one_scheduler_drives_16_simulated_executors(cache_dir: Path) -> None:
    """256 requests sent at once over 16 simulated executors: every one gets exactly its deterministic
    tokens, every executor is placed some work, and afterwards every block on every executor is free.
    Each request runs 64 steps, so they overlap even when the client's threads start slowly (with short
    ones on a loaded machine, fewer than 16 ran at a time and the last executor, losing every tie, got
    none). About 30 s here, most of it the 16 processes starting on 2 cores."""
    num_executors, num_requests, num_tokens = 16, 256, 64
    prompts = [[(11 * i + t) % 256 for t in range(8 + i % 40)] for i in range(num_requests)]
    with contextlib.ExitStack() as stack:
        stack.enter_context(pytest.MonkeyPatch.context()).setenv("PAGEWIRE_CACHE", str(cache_dir))
        executors = []
        for _ in range(num_executors):
            port = free_port()
            executors.append(f"127.0.0.1:{port}")
            stack.enter_context(running(["executor", "--simulate", PROFILE, "--port", str(port)], executors[-1]))
        port = free_port()
        address = f"127.0.0.1:{port}"
        args = ["scheduler", "--port", str(port), "--http-port", "0", "--max-model-len", "256",
                *(a for e in executors for a in ("--executor", e))]
        stack.enter_context(running(args, address, service="pagewire.v1.Generation"))
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GenerationStub(channel)
            deadline = time.monotonic() + 60
            while sum(e.ready for e in stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).executors) < 16:
                assert time.monotonic() < deadline, "not every executor got ready"
                time.sleep(0.2)

            def generate(prompt: list[int]) -> list[int]:
                request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                    sampling=pb.SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True))
                return [t for r in stub.Generate(request, timeout=120) for t in r.token_ids]

            with ThreadPoolExecutor(num_requests) as pool:
                outputs = list(pool.map(generate, prompts))
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert outputs == [reference(p, num_tokens) for p in prompts]
    assert sorted(e.address for e in info.executors) == sorted(executors)
    assert all(e.ready and e.num_requests_placed > 0 for e in info.executors), info.executors
    assert sum(e.num_requests_placed for e in info.executors) == num_requests
    assert all(e.num_free_device_blocks == e.num_device_blocks for e in info.executors)
    assert (info.num_running, info.num_waiting) == (0, 0)
