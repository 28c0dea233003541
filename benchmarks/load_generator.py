"""Sends a workload to a pagewire server over `pagewire.v1.Generation` and times every streamed response."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from benchmarks.metrics import RequestRecord
from benchmarks.progress import ProgressBar
from benchmarks.workloads import BenchRequest
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from shared.tls import channel_credentials

READY_POLL_INTERVAL_S = 0.2
# 5 prompt + 2 output tokens stay below the smallest block size (8), so no block of it is ever cached.
WARMUP_PROMPT_TOKEN_IDS = (1, 2, 3, 4, 5)


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """How requests are sent. `max_concurrency=None` puts no cap on requests in flight. `api_key` goes out
    as `authorization: Bearer KEY`; `tls_ca` (and for mutual TLS the client certificate and key) make the
    channel TLS, as `pagewire generate`'s flags of the same names do."""

    temperature: float = 0.0
    ignore_eos: bool = False
    seed: int | None = None
    max_concurrency: int | None = None
    timeout_s: float = 600.0
    api_key: str | None = None
    tls_ca: str | None = None
    tls_client_cert: str | None = None
    tls_client_key: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Records in workload order; `duration_s` runs from the start to the last response."""

    records: tuple[RequestRecord, ...]
    duration_s: float


def to_pb(request: BenchRequest, options: LoadOptions, request_id: str = "") -> pb.GenerateRequest:
    sampling = pb.SamplingParams(
        temperature=options.temperature, max_tokens=request.max_tokens, ignore_eos=options.ignore_eos
    )
    if options.seed is not None:
        sampling.seed = options.seed
    if request.prompt_token_ids:
        return pb.GenerateRequest(
            request_id=request_id, token_ids=pb.TokenIds(ids=request.prompt_token_ids), sampling=sampling
        )
    return pb.GenerateRequest(request_id=request_id, text=request.prompt_text, sampling=sampling)


def _channel(address: str, options: LoadOptions) -> grpc.aio.Channel:
    channel_options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    if options.tls_ca is None and options.tls_client_cert is None:
        return grpc.aio.insecure_channel(address, options=channel_options)
    credentials = channel_credentials(options.tls_ca, options.tls_client_cert, options.tls_client_key)
    return grpc.aio.secure_channel(address, credentials, options=channel_options)


async def wait_until_ready(address: str, timeout_s: float, options: LoadOptions = LoadOptions()) -> pb.ServerInfo:
    """The server's info once it is connected to a ready executor; raises TimeoutError otherwise, and
    PermissionError at once when the server refuses this client's API key."""
    deadline = time.monotonic() + timeout_s
    async with _channel(address, options) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while True:
            try:
                info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5, metadata=options.metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    raise PermissionError(f"the server at {address} refused this client: {error.details()}") from None
            else:
                if info.executor_ready:
                    return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server at {address} was not ready within {timeout_s} s")
            await asyncio.sleep(READY_POLL_INTERVAL_S)


async def _run_one(
    stub: pb_grpc.GenerationStub,
    index: int,
    request: BenchRequest,
    send_at: float,
    started: float,
    options: LoadOptions,
    limit: asyncio.Semaphore | None,
    progress: ProgressBar,
) -> RequestRecord:
    await asyncio.sleep(max(0.0, started + send_at - time.perf_counter()))
    async with limit if limit is not None else contextlib.nullcontext():
        send_time = time.perf_counter() - started
        chunk_times: list[float] = []
        chunk_num_tokens: list[int] = []
        token_ids: list[int] = []
        usage = pb.Usage()
        error = ""
        try:
            async for response in stub.Generate(
                to_pb(request, options, f"bench-{index}"), timeout=options.timeout_s, metadata=options.metadata
            ):
                if response.token_ids:
                    chunk_times.append(time.perf_counter() - started)
                    chunk_num_tokens.append(len(response.token_ids))
                    token_ids.extend(response.token_ids)
                if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    usage = response.usage
                    if response.finish_reason == pb.FINISH_REASON_ABORT:
                        error = "ABORTED: the server aborted the request"
        except grpc.aio.AioRpcError as rpc_error:
            error = f"{rpc_error.code().name}: {rpc_error.details()}"
        end_time = time.perf_counter() - started
    progress.update()
    return RequestRecord(
        index=index,
        send_time=send_time,
        end_time=end_time,
        chunk_times=tuple(chunk_times),
        chunk_num_tokens=tuple(chunk_num_tokens),
        num_prompt_tokens=usage.prompt_tokens or (request.num_prompt_tokens or 0),
        num_cached_prompt_tokens=usage.cached_prompt_tokens,
        output_token_ids=tuple(token_ids),
        error=error,
    )


async def run_load(
    address: str,
    requests: Sequence[BenchRequest],
    offsets: Sequence[float],
    options: LoadOptions,
    progress: ProgressBar | None = None,
) -> LoadResult:
    """Sends request i at `offsets[i]` seconds (waiting for a free slot under the concurrency cap)."""
    if len(offsets) != len(requests):
        raise ValueError(f"{len(offsets)} arrival offsets for {len(requests)} requests")
    progress = progress or ProgressBar(len(requests), "requests", enabled=False)
    limit = asyncio.Semaphore(options.max_concurrency) if options.max_concurrency else None
    async with _channel(address, options) as channel:
        stub = pb_grpc.GenerationStub(channel)
        started = time.perf_counter()
        records = await asyncio.gather(
            *(
                _run_one(stub, index, request, offset, started, options, limit, progress)
                for index, (request, offset) in enumerate(zip(requests, offsets))
            )
        )
    progress.close()
    duration = max((record.end_time for record in records), default=0.0)
    return LoadResult(records=tuple(records), duration_s=duration)


async def warm_up(address: str, like: BenchRequest, options: LoadOptions) -> None:
    """One short request, not measured: the first steps pay one-off costs (allocations, lazy inits).

    Its prompt shares nothing with the workload and is shorter than a KV block (with its outputs), so it
    leaves nothing in the prefix cache that a measured request could hit.
    """
    if like.prompt_token_ids:
        short = BenchRequest(max_tokens=2, prompt_token_ids=WARMUP_PROMPT_TOKEN_IDS)
    else:
        short = BenchRequest(max_tokens=2, prompt_text="Hi")
    async with _channel(address, options) as channel:
        stub = pb_grpc.GenerationStub(channel)
        async for _ in stub.Generate(to_pb(short, options), timeout=options.timeout_s, metadata=options.metadata):
            pass
