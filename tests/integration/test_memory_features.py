"""Prefix caching and swap / recompute preemption over real executor and scheduler processes."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import free_port, running, running_executor

BLOCK_SIZE = 16
NUM_SHARED_PREFIX_REQUESTS = 32
SHARED_PREFIX_LEN = 512
SHARED_NEW_TOKENS = 8
NUM_PRESSURE_REQUESTS = 16
PRESSURE_NEW_TOKENS = 64
# 24 blocks of 16 tokens: admission fills them with prompts, then every decode soon needs a block more.
# A 0.5 MiB swap space holds 32 blocks of the tiny model, so large victims fall back to recompute.
PRESSURE_EXECUTOR_ARGS = ("--num-gpu-blocks-override", "24", "--swap-space", "0.0005")
PRESSURE_MAX_MODEL_LEN = 384
RPC_TIMEOUT_SECONDS = 120.0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny"), seed=5)


@pytest.fixture(scope="module")
def hf_model(model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model


def hf_greedy(model, prompt: list[int], num_new_tokens: int) -> list[int]:
    # An explicit mask: without it, generate treats prompt tokens equal to pad_token_id as padding.
    out = model.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=num_new_tokens, do_sample=False, pad_token_id=0,
    )
    return out[0, len(prompt):].tolist()


def random_tokens(generator: torch.Generator, num_tokens: int) -> list[int]:
    return torch.randint(3, 256, (num_tokens,), generator=generator).tolist()


@pytest.fixture(scope="module")
def shared_prefix_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(11)
    prefix = random_tokens(generator, SHARED_PREFIX_LEN)
    suffix_lens = torch.randint(1, 40, (NUM_SHARED_PREFIX_REQUESTS,), generator=generator).tolist()
    return [prefix + random_tokens(generator, n) for n in suffix_lens]


@pytest.fixture(scope="module")
def pressure_prompts() -> list[list[int]]:
    """Mixed lengths; every other prompt starts with the same 32 tokens, so caching meets preemption."""
    generator = torch.Generator().manual_seed(13)
    prefix = random_tokens(generator, 32)
    lengths = torch.linspace(40, 100, NUM_PRESSURE_REQUESTS).round().int().tolist()
    return [
        (prefix + random_tokens(generator, n - 32)) if i % 2 else random_tokens(generator, n)
        for i, n in enumerate(lengths)
    ]


@pytest.fixture(scope="module")
def executor_address(model_dir: Path) -> Iterator[str]:
    with running_executor(model_dir) as address:
        yield address


@pytest.fixture(scope="module")
def pressure_executor_address(model_dir: Path) -> Iterator[str]:
    with running_executor(model_dir, *PRESSURE_EXECUTOR_ARGS) as address:
        yield address


@contextlib.contextmanager
def scheduler_on(executor_address: str, *extra: str) -> Iterator[pb_grpc.GenerationStub]:
    """A scheduler process (logging warnings only) over a running executor; yields a stub once ready."""
    port = free_port()
    address = f"127.0.0.1:{port}"
    # Warnings only: the scheduler's stderr is a pipe read at exit, and a full pipe would block it.
    args = ["--log-level", "warning", "scheduler", "--executor", executor_address, "--port", str(port), "--http-port", "0"]
    args.extend(extra)
    with running(args, address, service="pagewire.v1.Generation"), grpc.insecure_channel(address) as channel:
        yield pb_grpc.GenerationStub(channel)


def greedy_request(prompt: list[int], max_tokens: int, cache_salt: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=prompt),
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
        cache_salt=cache_salt,
    )


def generate(stub: pb_grpc.GenerationStub, request: pb.GenerateRequest) -> tuple[list[int], pb.Usage]:
    responses = list(stub.Generate(request, timeout=RPC_TIMEOUT_SECONDS))
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    return [t for r in responses for t in r.token_ids], responses[-1].usage


def generate_all(
    stub: pb_grpc.GenerationStub, prompts: list[list[int]], max_tokens: int
) -> tuple[list[list[int]], list[pb.Usage], pb.ServerInfo]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: generate(stub, greedy_request(p, max_tokens)), prompts))
    info = server_info(stub)
    assert (info.num_running, info.num_waiting, info.num_swapped) == (0, 0, 0)
    assert info.num_free_device_blocks == info.num_device_blocks
    assert info.num_free_host_blocks == info.num_host_blocks
    return [tokens for tokens, _ in results], [usage for _, usage in results], info


def server_info(stub: pb_grpc.GenerationStub) -> pb.ServerInfo:
    return stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)


def test_shared_prefix_is_computed_once_and_outputs_equal_caching_off_and_transformers(
    executor_address: str, hf_model, shared_prefix_prompts: list[list[int]]
) -> None:
    prompts = shared_prefix_prompts
    with scheduler_on(executor_address) as stub:
        cached_outputs, usages, on = generate_all(stub, prompts, SHARED_NEW_TOKENS)
    with scheduler_on(executor_address, "--no-enable-prefix-caching") as stub:
        uncached_outputs, _, off = generate_all(stub, prompts, SHARED_NEW_TOKENS)

    assert cached_outputs == uncached_outputs
    for i in (0, 1, len(prompts) - 1):
        assert cached_outputs[i] == hf_greedy(hf_model, prompts[i], SHARED_NEW_TOKENS), f"request {i}"
    num_reused = (NUM_SHARED_PREFIX_REQUESTS - 1) * SHARED_PREFIX_LEN
    assert off.num_prompt_tokens_computed == sum(len(p) for p in prompts)
    assert (off.num_prompt_tokens_cached, off.num_cached_device_blocks) == (0, 0)
    # The prefix is 32 whole blocks: every request but the first reuses all of it, and nothing else.
    assert on.num_prompt_tokens_computed == off.num_prompt_tokens_computed - num_reused
    assert on.num_prompt_tokens_cached == num_reused
    assert sorted(u.cached_prompt_tokens for u in usages) == [0] + [SHARED_PREFIX_LEN] * (len(prompts) - 1)
    # Cached blocks nobody holds are free, and reported apart.
    assert on.num_cached_device_blocks >= SHARED_PREFIX_LEN // BLOCK_SIZE
    assert on.num_free_cached_device_blocks == on.num_cached_device_blocks
    assert on.num_preemptions == off.num_preemptions == 0


def test_different_salts_share_nothing_and_equal_salts_share(
    executor_address: str, hf_model, shared_prefix_prompts: list[list[int]]
) -> None:
    prompt = shared_prefix_prompts[0][:100]
    expected = hf_greedy(hf_model, prompt, SHARED_NEW_TOKENS)
    with scheduler_on(executor_address) as stub:
        cached = []
        for salt in ("tenant-a", "tenant-b", "", "tenant-a"):
            tokens, usage = generate(stub, greedy_request(prompt, SHARED_NEW_TOKENS, cache_salt=salt))
            assert tokens == expected
            cached.append(usage.cached_prompt_tokens)
        assert cached == [0, 0, 0, 96]
        assert server_info(stub).num_prompt_tokens_computed == 3 * 100 + 4


@pytest.fixture(scope="module")
def pressure_reference(executor_address: str, hf_model, pressure_prompts: list[list[int]]) -> list[list[int]]:
    """The tokens without memory pressure (a roomy pool, no preemption), spot-checked against transformers."""
    with scheduler_on(executor_address, "--max-model-len", str(PRESSURE_MAX_MODEL_LEN)) as stub:
        outputs, _, info = generate_all(stub, pressure_prompts, PRESSURE_NEW_TOKENS)
    assert info.num_preemptions == 0
    for i in (0, len(pressure_prompts) - 1):
        assert outputs[i] == hf_greedy(hf_model, pressure_prompts[i], PRESSURE_NEW_TOKENS), f"request {i}"
    return outputs


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_every_preemption_mode_gives_the_unpressured_tokens_and_frees_everything(
    pressure_executor_address: str,
    pressure_prompts: list[list[int]],
    pressure_reference: list[list[int]],
    mode: str,
) -> None:
    args = ("--preemption-mode", mode, "--max-model-len", str(PRESSURE_MAX_MODEL_LEN))
    with scheduler_on(pressure_executor_address, *args) as stub:
        outputs, _, info = generate_all(stub, pressure_prompts, PRESSURE_NEW_TOKENS)
    for i, (got, want) in enumerate(zip(outputs, pressure_reference)):
        assert got == want, f"request {i} (prompt of {len(pressure_prompts[i])} tokens)"
    assert (info.num_device_blocks, info.num_host_blocks) == (24, 32)
    assert info.num_preemptions == info.num_preemptions_swap + info.num_preemptions_recompute > 0
    assert info.num_blocks_swapped_out == info.num_blocks_swapped_in
    assert info.num_prompt_tokens_cached > 0
    if mode == "swap":
        assert info.num_preemptions_swap > 0 and info.num_blocks_swapped_out > 0
    if mode == "recompute":
        assert info.num_preemptions_swap == 0 and info.num_blocks_swapped_out == 0
        assert info.num_tokens_recomputed > 0


def test_cancelling_requests_while_some_are_swapped_out_leaks_nothing(
    pressure_executor_address: str, pressure_prompts: list[list[int]]
) -> None:
    args = ("--preemption-mode", "swap", "--max-model-len", str(PRESSURE_MAX_MODEL_LEN))
    with scheduler_on(pressure_executor_address, *args) as stub:
        calls = [
            stub.Generate(greedy_request(p, PRESSURE_MAX_MODEL_LEN - len(p)), timeout=RPC_TIMEOUT_SECONDS)
            for p in pressure_prompts
        ]
        errors: list[grpc.StatusCode] = []

        def drain(call) -> None:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as error:
                errors.append(error.code())

        threads = [threading.Thread(target=drain, args=(call,)) for call in calls]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while server_info(stub).num_swapped == 0:
            assert time.monotonic() < deadline, "no request was ever swapped out"
            time.sleep(0.005)
        for call in calls:
            call.cancel()
        for thread in threads:
            thread.join(timeout=30)
        assert set(errors) == {grpc.StatusCode.CANCELLED}
        deadline = time.monotonic() + 10
        while (info := server_info(stub)).num_running + info.num_waiting > 0:
            assert time.monotonic() < deadline, f"requests still live after cancel: {info}"
            time.sleep(0.05)
        assert info.num_swapped == 0
        assert info.num_free_host_blocks == info.num_host_blocks
        assert info.num_free_device_blocks == info.num_device_blocks
        assert info.num_preemptions_swap > 0
