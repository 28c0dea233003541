"""Many adapters through few slots, real processes: 100 registered adapters, 2 LoRA slots, a host cache of
8 and 64 concurrent requests all equal PEFT, with adapters loaded and unloaded meanwhile; afterwards
every KV block is free, no request is counted on any adapter and at most 2 adapters sit in slots."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.peft_adapters import make_peft_adapter, peft_greedy
from tests.helpers.processes import running_server

NUM_ADAPTERS = 100
NUM_REQUESTS = 64
MAX_TOKENS = 6
TARGET_SETS = (("q_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj", "down_proj"), ("k_proj", "v_proj"))


def adapter_of(request: int) -> int | None:
    """Every 8th request uses the base model; the rest spread over the 100 adapters."""
    return None if request % 8 == 0 else (request * 37) % NUM_ADAPTERS


def prompt_of(request: int) -> tuple[int, ...]:
    return tuple(3 + (request * 7 + i) % 250 for i in range(4 + request % 9))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("scale") / "tiny", seed=11)


@pytest.fixture(scope="module")
def adapter_dirs(base: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [
        make_peft_adapter(base, root / f"ad{i}", rank=(2, 4, 8, 16)[i % 4], target_modules=TARGET_SETS[i % 4],
                          lora_alpha=8, seed=1000 + i)
        for i in range(NUM_ADAPTERS)
    ]


@pytest.fixture(scope="module")
def expected(base: Path, adapter_dirs: list[Path]) -> list[list[int]]:
    return [
        peft_greedy(base, None if (a := adapter_of(r)) is None else adapter_dirs[a], prompt_of(r), MAX_TOKENS)
        for r in range(NUM_REQUESTS)
    ]


def generate(stub: pb_grpc.GenerationStub, request: int) -> list[int]:
    adapter = adapter_of(request)
    message = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=list(prompt_of(request))), adapter="" if adapter is None else f"ad{adapter}",
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    return [t for response in stub.Generate(message, timeout=300) for t in response.token_ids]


def test_100_adapters_through_2_slots_with_64_concurrent_requests_equal_peft(
    base: Path, adapter_dirs: list[Path], expected: list[list[int]], tmp_path: Path
) -> None:
    churn = [make_peft_adapter(base, tmp_path / f"churn{i}", rank=4, target_modules=["q_proj"], lora_alpha=4,
                               seed=i) for i in range(10)]
    with running_server(
        base,
        executor_args=("--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", "--max-cpu-loras", "8"),
        scheduler_args=("--enable-lora", "--max-num-seqs", "16", "--max-num-batched-tokens", "64"),
    ) as address:
        stub = pb_grpc.GenerationStub(grpc.insecure_channel(address))
        for i, path in enumerate(adapter_dirs):
            stub.LoadAdapter(pb.LoadAdapterRequest(name=f"ad{i}", path=str(path)), timeout=30)

        stop = threading.Event()
        churned: list[str] = []

        def load_and_unload_meanwhile() -> None:
            """Runtime loads and unloads of adapters no request uses, while the requests run."""
            for i, path in enumerate(churn):
                if stop.is_set():
                    return
                stub.LoadAdapter(pb.LoadAdapterRequest(name=f"churn{i}", path=str(path)), timeout=30)
                stub.UnloadAdapter(pb.UnloadAdapterRequest(name=f"churn{i}"), timeout=30)
                churned.append(f"churn{i}")
                time.sleep(0.05)

        churner = threading.Thread(target=load_and_unload_meanwhile)
        churner.start()
        try:
            with ThreadPoolExecutor(NUM_REQUESTS) as pool:
                results = list(pool.map(lambda r: generate(stub, r), range(NUM_REQUESTS)))
        finally:
            stop.set()
            churner.join()
        for request, (got, want) in enumerate(zip(results, expected, strict=True)):
            assert got == want, f"request {request} (adapter {adapter_of(request)})"

        deadline = time.monotonic() + 30
        while True:
            info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
            if info.num_running == 0 and info.num_waiting == 0:
                break
            assert time.monotonic() < deadline, info
            time.sleep(0.1)
        assert info.num_free_device_blocks == info.num_device_blocks
        listed = stub.ListAdapters(pb.ListAdaptersRequest(), timeout=5).adapters
        assert [a.name for a in listed] == [f"ad{i}" for i in range(NUM_ADAPTERS)]
        assert all(a.num_requests == 0 for a in listed)
        assert sum(a.is_loaded_on_device for a in listed) <= 2
        assert churned == [f"churn{i}" for i in range(len(churn))] or not churned
