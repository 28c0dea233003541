"""One scheduler over several real executor processes: spread, prefix-aware placement, kill -9 of an
executor mid-stream, an executor joining late, drain. Tokens are checked against transformers."""

from __future__ import annotations

import contextlib
import subprocess
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
from tests.helpers.hf_reference import hf_greedy, load_hf_model
from tests.helpers.processes import cpu_executor_args, free_port, running

GENERATION_SERVICE = "pagewire.v1.Generation"
NUM_REQUESTS = 48
NUM_NEW_TOKENS = 12
NUM_LONG_TOKENS = 40
PREFIX_LEN = 96  # six 16-token blocks
NUM_PREFIX_REQUESTS = 5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"), seed=3)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    lengths = torch.linspace(5, 120, NUM_REQUESTS).round().int().tolist()
    return [torch.randint(0, 256, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def prefix_prompts() -> list[list[int]]:
    """One warm-up and NUM_PREFIX_REQUESTS more: a shared 96-token prefix, then 4 tokens of their own."""
    generator = torch.Generator().manual_seed(12)
    prefix = torch.randint(0, 256, (PREFIX_LEN,), generator=generator).tolist()
    return [prefix + [i, i + 1, i + 2, i + 3] for i in range(NUM_PREFIX_REQUESTS + 1)]


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    return load_hf_model(model_dir)


@pytest.fixture(scope="module")
def reference(hf_model, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(hf_model, p, NUM_NEW_TOKENS) for p in prompts]


@pytest.fixture(scope="module")
def long_reference(hf_model, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(hf_model, p, NUM_LONG_TOKENS) for p in prompts[:16]]


@dataclass
class Cluster:
    scheduler: str
    executors: dict[str, subprocess.Popen]

    def info(self) -> pb.ServerInfo:
        with grpc.insecure_channel(self.scheduler) as channel:
            return pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)

    def by_address(self) -> dict[str, pb.ExecutorStatus]:
        return {status.address: status for status in self.info().executors}

    def placed(self) -> dict[str, int]:
        return {address: status.num_requests_placed for address, status in self.by_address().items()}

    def wait_until(self, condition, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self.by_address()):
                return
            time.sleep(0.1)
        raise TimeoutError(f"{what} within {timeout} s: {self.by_address()}")


@contextlib.contextmanager
def executor_process(model_dir: Path, port: int) -> Iterator[subprocess.Popen]:
    with running(cpu_executor_args(model_dir, port), f"127.0.0.1:{port}") as process:
        yield process


@contextlib.contextmanager
def cluster_of(model_dir: Path, num_started: int, num_addresses: int) -> Iterator[Cluster]:
    """A scheduler over `num_addresses` executor ports, of which the first `num_started` serve."""
    ports = [free_port() for _ in range(num_addresses)]
    with contextlib.ExitStack() as stack:
        executors = {
            f"127.0.0.1:{port}": stack.enter_context(executor_process(model_dir, port)) for port in ports[:num_started]
        }
        port = free_port()
        args = ["scheduler", "--port", str(port), "--http-port", "0"]
        for executor_port in ports:
            args += ["--executor", f"127.0.0.1:{executor_port}"]
        stack.enter_context(running(args, f"127.0.0.1:{port}", service=GENERATION_SERVICE))
        cluster = Cluster(f"127.0.0.1:{port}", executors)
        cluster.wait_until(
            lambda s: sum(status.ready for status in s.values()) == num_started, "every started executor ready"
        )
        yield cluster


def greedy_request(prompt: list[int], max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )


def generate(address: str, prompt: list[int], max_tokens: int, first_token: threading.Event | None = None) -> list[int]:
    tokens: list[int] = []
    with grpc.insecure_channel(address) as channel:
        responses = pb_grpc.GenerationStub(channel).Generate(greedy_request(prompt, max_tokens), timeout=300)
        for response in responses:
            tokens.extend(response.token_ids)
            if first_token is not None and tokens:
                first_token.set()
            last = response
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == len(tokens)
    return tokens


def generate_all(address: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: generate(address, p, max_tokens), prompts))


def assert_all_blocks_free(cluster: Cluster) -> None:
    info = cluster.info()
    for status in info.executors:
        if status.ready:
            assert (status.address, status.num_free_device_blocks, status.num_running) == (
                status.address, status.num_device_blocks, 0
            )
    assert info.num_free_device_blocks == info.num_device_blocks
    assert (info.num_running, info.num_waiting) == (0, 0)


@pytest.fixture(scope="module")
def three(model_dir: Path) -> Iterator[Cluster]:
    with cluster_of(model_dir, 3, 3) as cluster:
        yield cluster


def test_48_concurrent_requests_spread_over_three_executors_and_match_transformers(
    three: Cluster, prompts: list[list[int]], reference: list[list[int]]
) -> None:
    assert generate_all(three.scheduler, prompts, NUM_NEW_TOKENS) == reference
    info = three.info()
    placed = [status.num_requests_placed for status in info.executors]
    assert len(placed) == 3 and sum(placed) == NUM_REQUESTS and min(placed) > 0, placed
    assert info.num_device_blocks == sum(status.num_device_blocks for status in info.executors)
    assert info.num_prompt_tokens_cached == sum(status.num_prompt_tokens_cached for status in info.executors)
    assert_all_blocks_free(three)


def test_a_shared_prefix_batch_lands_on_the_executor_holding_the_prefix(
    three: Cluster, prefix_prompts: list[list[int]], hf_model
) -> None:
    before = three.placed()
    warm_up = prefix_prompts[0]
    assert generate(three.scheduler, warm_up, NUM_NEW_TOKENS) == hf_greedy(hf_model, warm_up, NUM_NEW_TOKENS)
    after_warm_up = three.placed()
    (holder,) = [address for address in before if after_warm_up[address] == before[address] + 1]
    computed_before = three.info().num_prompt_tokens_computed

    batch = prefix_prompts[1:]
    assert generate_all(three.scheduler, batch, NUM_NEW_TOKENS) == [
        hf_greedy(hf_model, p, NUM_NEW_TOKENS) for p in batch
    ]
    after = three.placed()
    assert {address: after[address] - after_warm_up[address] for address in after} == {
        address: NUM_PREFIX_REQUESTS if address == holder else 0 for address in after
    }
    # As on one executor: only the 4 tokens after the cached prefix are computed per request.
    assert three.info().num_prompt_tokens_computed - computed_before == NUM_PREFIX_REQUESTS * 4
    assert_all_blocks_free(three)


def test_kill_9_of_an_executor_mid_stream_loses_no_request_and_no_token(
    three: Cluster, prompts: list[list[int]], long_reference: list[list[int]]
) -> None:
    """Runs last on the module's cluster: it kills one of its executors."""
    first_tokens = [threading.Event() for _ in long_reference]
    with ThreadPoolExecutor(len(long_reference)) as pool:
        futures = [
            pool.submit(generate, three.scheduler, prompt, NUM_LONG_TOKENS, event)
            for prompt, event in zip(prompts[:16], first_tokens)
        ]
        for event in first_tokens:
            assert event.wait(60)
        busiest = max(three.by_address().values(), key=lambda status: status.num_running)
        assert busiest.num_running > 0
        victim = three.executors[busiest.address]
        victim.kill()
        victim.wait()
        results = [future.result(timeout=300) for future in futures]
    assert results == long_reference
    statuses = three.by_address()
    assert not statuses[busiest.address].ready
    assert_all_blocks_free(three)


def test_an_executor_started_late_receives_work_and_a_drained_one_gets_none(
    model_dir: Path, prompts: list[list[int]], reference: list[list[int]], long_reference: list[list[int]]
) -> None:
    with cluster_of(model_dir, 1, 2) as cluster:
        (early,) = cluster.executors
        late = next(address for address in cluster.by_address() if address != early)
        assert not cluster.by_address()[late].ready
        with executor_process(model_dir, int(late.rsplit(":", 1)[1])):
            cluster.wait_until(lambda s: s[late].ready, "the late executor ready")
            assert generate_all(cluster.scheduler, prompts[:8], NUM_NEW_TOKENS) == reference[:8]
            assert cluster.placed()[late] > 0

            # Drain the late one while it runs requests: they finish, nothing new goes there.
            first_tokens = [threading.Event() for _ in range(8)]
            with ThreadPoolExecutor(16) as pool:
                running_futures = [
                    pool.submit(generate, cluster.scheduler, prompt, NUM_LONG_TOKENS, event)
                    for prompt, event in zip(prompts[:8], first_tokens)
                ]
                for event in first_tokens:
                    assert event.wait(60)
                with grpc.insecure_channel(cluster.scheduler) as channel:
                    stub = pb_grpc.GenerationStub(channel)
                    drained = stub.DrainExecutor(pb.DrainExecutorRequest(address=late), timeout=10)
                    with pytest.raises(grpc.RpcError) as unknown:
                        stub.DrainExecutor(pb.DrainExecutorRequest(address="127.0.0.1:1"), timeout=10)
                assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
                assert (drained.draining, drained.ready, drained.num_running > 0) == (True, False, True)
                placed_at_drain = cluster.placed()[late]
                new_futures = [pool.submit(generate, cluster.scheduler, p, NUM_NEW_TOKENS) for p in prompts[8:16]]
                assert [f.result(timeout=300) for f in new_futures] == reference[8:16]
                assert [f.result(timeout=300) for f in running_futures] == long_reference[:8]
            assert cluster.placed()[late] == placed_at_drain
            cluster.wait_until(lambda s: not s[late].draining or s[late].num_running == 0, "the drain done")
            assert_all_blocks_free(cluster)
