"""Weights replaced in place are noticed: an executor restarted on the same directory with other weights
has another fingerprint, so the request it would have continued ends UNAVAILABLE ("the model changed")
instead of finishing on other weights, and the scheduler refuses the executor."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from executor_service.model.weights_fingerprint import weights_fingerprint
from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import cpu_executor_args, free_port, running, running_scheduler, wait_health


def test_the_fingerprint_follows_the_weights_not_the_path(tmp_path: Path) -> None:
    model = create_tiny_model(tmp_path / "m", seed=0)
    first = weights_fingerprint(model)
    assert weights_fingerprint(model) == first and len(first) == 32
    create_tiny_model(tmp_path / "m", seed=1)  # same shapes, same header sizes, other values
    assert weights_fingerprint(model) != first
    gguf_like = tmp_path / "w.gguf"
    gguf_like.write_bytes(b"GGUF" + bytes(300_000))
    before = weights_fingerprint(gguf_like)
    data = bytearray(gguf_like.read_bytes())
    data[200_000] = 1
    gguf_like.write_bytes(bytes(data))
    assert weights_fingerprint(gguf_like) != before


def test_an_executor_back_with_other_weights_ends_the_request_it_would_continue(tmp_path: Path) -> None:
    model = create_tiny_model(tmp_path / "tiny", seed=0)
    port = free_port()
    executor_address = f"127.0.0.1:{port}"
    with running_scheduler(executor_address, "--reconnect-grace-seconds", "120") as address:
        errors: list[grpc.RpcError] = []
        tokens: list[int] = []
        started = threading.Event()
        with running(cpu_executor_args(model, port), executor_address) as executor:
            wait_health(address, "pagewire.v1.Generation", 1)

            def stream() -> None:
                request = pb.GenerateRequest(
                    token_ids=pb.TokenIds(ids=[1, 2, 3]),
                    sampling=pb.SamplingParams(temperature=0.0, max_tokens=3000, ignore_eos=True),
                )
                try:
                    with grpc.insecure_channel(address) as channel:
                        for response in pb_grpc.GenerationStub(channel).Generate(request, timeout=180):
                            tokens.extend(response.token_ids)
                            started.set()
                except grpc.RpcError as error:
                    errors.append(error)

            thread = threading.Thread(target=stream)
            thread.start()
            assert started.wait(60)
            executor.kill()
            executor.wait()
        create_tiny_model(tmp_path / "tiny", seed=1)
        with running(cpu_executor_args(model, port), executor_address):
            thread.join(timeout=120)
            assert not thread.is_alive()
            assert len(errors) == 1 and errors[0].code() is grpc.StatusCode.UNAVAILABLE, tokens[-5:]
            assert "the model changed" in errors[0].details() and "its weights changed" in errors[0].details()
            # The scheduler keeps refusing the executor: nothing is served from other weights.
            time.sleep(1)
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2]), sampling=pb.SamplingParams(max_tokens=2))
            with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as refused:
                list(pb_grpc.GenerationStub(channel).Generate(request, timeout=10))
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
