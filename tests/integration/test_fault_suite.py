"""Trying to break a running server as a hostile or clumsy client would, over real processes on
loopback: a cancellation storm, a 2,000-request soak, and 3.9 MB prompts while another stream runs.

Figures seen on the 2-core development machine (shared, noisy) are in each test's docstring; the
assertions are about exact state (tokens, blocks, codes), and the two that involve time or memory use
margins several times what a regression showed."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.hf_reference import hf_greedy_all
from tests.helpers.processes import cpu_executor_args, free_port, running

GENERATION = "pagewire.v1.Generation"
NUM_PROMPTS = 8
NUM_NEW_TOKENS = 24


@dataclass(frozen=True, slots=True)
class Server:
    address: str
    scheduler_pid: int
    executor_pid: int


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    executor_port, port = free_port(), free_port()
    executor_address, address = f"127.0.0.1:{executor_port}", f"127.0.0.1:{port}"
    with running(cpu_executor_args(model_dir, executor_port), executor_address) as executor:
        args = ["scheduler", "--executor", executor_address, "--port", str(port), "--http-port", "0"]
        with running(args, address, service=GENERATION) as scheduler:
            yield Server(address, scheduler.pid, executor.pid)


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[pb_grpc.GenerationStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.GenerationStub(channel)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, 256, (int(n),), generator=generator).tolist()
            for n in torch.linspace(4, 120, NUM_PROMPTS).round().int()]


@pytest.fixture(scope="module")
def reference(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy tokens for each prompt (EOS ignored)."""
    return hf_greedy_all(model_dir, prompts, NUM_NEW_TOKENS)


def greedy(prompt: list[int], max_tokens: int = NUM_NEW_TOKENS) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                              sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def assert_idle(stub: pb_grpc.GenerationStub, timeout: float = 10.0) -> pb.ServerInfo:
    """Nothing runs or waits and every device block is free (cached prefixes count as free)."""
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
        idle = (info.num_running, info.num_waiting) == (0, 0) and info.num_free_device_blocks == info.num_device_blocks
        if idle or time.monotonic() > deadline:
            assert idle, f"not idle {timeout} s after the last request ended:\n{info}"
            return info
        time.sleep(0.05)


def test_cancellation_storm_leaves_exact_tokens_for_the_rest_and_no_block(
    stub: pb_grpc.GenerationStub, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    """200 concurrent requests: 100 are cancelled by the client after a random number of tokens (1 to
    all but the last), 30 more carry deadlines far too short to finish; the other 70 stream exactly
    transformers' tokens. Afterwards nothing runs, nothing waits, every block is free. About 15 s here."""
    rng = random.Random(2026)
    plans = ["cancel"] * 100 + ["deadline"] * 30 + ["complete"] * 70
    rng.shuffle(plans)
    # Drawn here, not in the threads, so the storm is the same every run.
    timeouts = [rng.uniform(0.01, 0.3) if plan == "deadline" else 120.0 for plan in plans]
    cancel_points = [rng.randrange(1, NUM_NEW_TOKENS) if plan == "cancel" else None for plan in plans]

    def one(index: int, plan: str) -> tuple[str, int, list[int], grpc.StatusCode | None]:
        which = index % NUM_PROMPTS
        call = stub.Generate(greedy(prompts[which]), timeout=timeouts[index])
        cancel_after = cancel_points[index]
        received: list[int] = []
        try:
            for response in call:
                received.extend(response.token_ids)
                if cancel_after is not None and len(received) >= cancel_after:
                    call.cancel()
                    break
        except grpc.RpcError as error:
            return plan, which, received, error.code()
        return plan, which, received, None

    with ThreadPoolExecutor(64) as pool:
        outcomes = list(pool.map(lambda item: one(*item), enumerate(plans)))
    for plan, which, received, code in outcomes:
        # Whatever arrived before a cancel or a deadline is a prefix of the reference: nothing wrong, nothing
        # repeated.
        assert received == reference[which][:len(received)], (plan, which)
        if plan == "complete":
            assert code is None and received == reference[which]
        elif plan == "deadline":
            assert code in (None, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert_idle(stub)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def mixed_request(rng: random.Random, prompts: list[list[int]]) -> pb.GenerateRequest:
    """Greedy or seeded sampling, with penalties, stop strings, logprobs, text or token ids."""
    sampling = pb.SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.5:
        sampling.temperature = rng.choice([0.7, 1.0])
        sampling.top_p = rng.choice([1.0, 0.9])
        sampling.top_k = rng.choice([0, 20])
        sampling.seed = rng.randrange(1 << 30)
    if rng.random() < 0.3:
        sampling.repetition_penalty = 1.1
        sampling.frequency_penalty = 0.5
    if rng.random() < 0.3:
        sampling.stop.append(rng.choice(["a", "e", "th"]))
    if rng.random() < 0.2:
        sampling.logprobs = 3
    if rng.random() < 0.3:
        return pb.GenerateRequest(text="The soak " * rng.randint(1, 30), sampling=sampling)
    prompt = rng.choice(prompts)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt[: rng.randint(1, len(prompt))]), sampling=sampling)


def soak(stub: pb_grpc.GenerationStub, prompts: list[list[int]], count: int, seed: int) -> int:
    """`count` mixed requests, 48 at a time, a tenth of them cancelled early; returns how many completed."""
    rng = random.Random(seed)
    requests = [mixed_request(rng, prompts) for _ in range(count)]
    cancels = {i for i in range(count) if rng.random() < 0.1}

    def one(index: int) -> bool:
        call = stub.Generate(requests[index], timeout=120)
        for response in call:
            if index in cancels:
                call.cancel()
                return False
            if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                return True
        return False

    with ThreadPoolExecutor(48) as pool:
        return sum(pool.map(one, range(count)))


def test_a_2000_request_soak_grows_neither_process_after_the_first_pass(
    server: Server, stub: pb_grpc.GenerationStub, prompts: list[list[int]]
) -> None:
    """Two passes of 1,000 mixed requests (greedy and seeded sampling, penalties, stop strings, logprobs,
    text and token prompts, a tenth cancelled). Every block is free after each pass, and the second
    pass grows neither process's RSS by more than max(24 MiB, 5%): the first pass warms allocators and
    caches. Seen here (MiB, before -> after pass 1 -> after pass 2): scheduler 95 -> 100 -> 100, executor
    790-916 -> 1043-1087 -> 1103-1123, in about 35 s. Four more passes of 1,000 grew the executor by 9-16 MiB
    each (with oneDNN's primitive cache off, ONEDNN_PRIMITIVE_CACHE_CAPACITY=0: 7-24 MiB from a lower base),
    so this bound would catch a leak of about 50 KiB per request, not that drift."""
    before = rss_bytes(server.scheduler_pid), rss_bytes(server.executor_pid)
    completed = soak(stub, prompts, 1000, seed=1)
    assert_idle(stub)
    after_first = rss_bytes(server.scheduler_pid), rss_bytes(server.executor_pid)
    completed += soak(stub, prompts, 1000, seed=2)
    assert_idle(stub)
    after_second = rss_bytes(server.scheduler_pid), rss_bytes(server.executor_pid)
    print(f"soak: {completed} of 2000 completed; RSS scheduler {before[0] >> 20} -> {after_first[0] >> 20} -> "
          f"{after_second[0] >> 20} MiB, executor {before[1] >> 20} -> {after_first[1] >> 20} -> "
          f"{after_second[1] >> 20} MiB")
    assert completed >= 1700  # the ~10% cancelled ones do not complete
    for warmed, final in zip(after_first, after_second, strict=True):
        assert final - warmed <= max(24 << 20, warmed // 20), (before, after_first, after_second)


def test_three_3_9_mb_prompts_are_refused_without_stalling_another_stream(
    stub: pb_grpc.GenerationStub, prompts: list[list[int]]
) -> None:
    """While one request streams 400 tokens, three 3.9 MB text prompts (under the 4 MiB message limit)
    are sent one after another: each is refused with INVALID_ARGUMENT before tokenizing, and the stream's
    longest gap between two responses stays under 2 s. Before the byte-length check and off-loop
    tokenizing, each such prompt stopped every stream and the health checks for 3.3-4.4 s; now the
    refusals take ~50 ms each and the longest gap is about as long as without them (tens of ms)."""
    arrivals: list[float] = []
    streaming = threading.Event()

    def stream() -> int:
        count = 0
        for response in stub.Generate(greedy(prompts[0], max_tokens=400), timeout=300):
            arrivals.append(time.monotonic())
            count += len(response.token_ids)
            streaming.set()
        return count

    with ThreadPoolExecutor(1) as pool:
        streamed = pool.submit(stream)
        assert streaming.wait(60)
        big = pb.GenerateRequest(text="x" * 3_900_000, sampling=pb.SamplingParams(max_tokens=4))
        refused_at = []
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(big, timeout=30))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "prompt" in caught.value.details()
            refused_at.append(time.monotonic())
        assert streamed.result() == 400
    window = [t for t in arrivals if t <= refused_at[-1] + 0.5]
    assert len(window) >= 2, "the stream ended before the prompts were refused; lengthen it"
    gaps = [b - a for a, b in zip(window, window[1:], strict=False)]
    assert max(gaps) < 2.0, f"longest gap {max(gaps):.2f} s while the prompts were refused"
    assert_idle(stub)
