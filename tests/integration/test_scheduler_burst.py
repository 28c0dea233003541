"""A burst of thousands of Generate streams opened at once on one connection: every one reaches the
engine and completes with the simulated executor's deterministic tokens. gRPC's defaults cancel calls
past 1000 not yet taken by the asyncio server (clients saw CANCELLED and the scheduler never saw the
request); scheduler_service/grpc_server_options.py raises those limits."""

from __future__ import annotations

import asyncio
import collections

import grpc

from executor_service.simulation.simulated_runner import simulated_next_token
from executor_service.tiny_tokenizer import TINY_VOCAB_SIZE
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.processes import free_port, running

NUM_REQUESTS = 2048
MAX_TOKENS = 3


def reference(prompt: list[int]) -> list[int]:
    tokens = list(prompt)
    for _ in range(MAX_TOKENS):
        tokens.append(simulated_next_token(tokens, TINY_VOCAB_SIZE))
    return tokens[len(prompt):]


async def burst(address: str, prompts: list[list[int]]) -> tuple[list[list[int] | None], collections.Counter[str]]:
    errors: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(prompt: list[int]) -> list[int] | None:
            request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                sampling=pb.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
            tokens: list[int] = []
            try:
                async for response in stub.Generate(request, timeout=300):
                    tokens.extend(response.token_ids)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                return None
            return tokens

        outputs = await asyncio.gather(*(one(prompt) for prompt in prompts))
    return list(outputs), errors


def test_2048_streams_opened_at_once_all_complete_with_the_deterministic_tokens() -> None:
    executor_port, port = free_port(), free_port()
    executor_address, address = f"127.0.0.1:{executor_port}", f"127.0.0.1:{port}"
    prompts = [[(i * 31 + t) % 256 for t in range(8)] + [i % 256, i // 256] for i in range(NUM_REQUESTS)]
    with running(["executor", "--simulate", "h100_llama3_8b", "--port", str(executor_port)], executor_address):
        with running(["scheduler", "--executor", executor_address, "--port", str(port), "--http-port", "0",
                      "--max-queued-requests", str(2 * NUM_REQUESTS)], address, service="pagewire.v1.Generation"):
            outputs, errors = asyncio.run(burst(address, prompts))
    assert dict(errors) == {}
    assert outputs == [reference(prompt) for prompt in prompts]
