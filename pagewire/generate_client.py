"""`pagewire generate`: a streaming client of the public Generation API that waits for readiness."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from shared.setting import setting
from shared.tls import channel_credentials

GENERATION_SERVICE = "pagewire.v1.Generation"
# How long to wait for anything to answer at the address before saying nothing listens there.
CONNECT_SECONDS = 3.0
READY_POLL_SECONDS = 0.25
API_KEY_ENV = "PAGEWIRE_API_KEY"


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What `pagewire generate` and `pagewire chat` share: where the server is and how to sample."""

    address: str = setting("127.0.0.1:50051", help="the scheduler's public gRPC API", metavar="HOST:PORT")
    timeout: float = setting(
        120.0, help="seconds to wait for the server to be ready and for each answer"
    )
    api_key: str | None = setting(
        None, help=f"sent as `authorization: Bearer KEY` metadata (env {API_KEY_ENV})", default_text="none"
    )
    max_tokens: int = setting(64, help="most tokens to generate per answer")
    temperature: float = setting(0.0, help="sampling temperature (0: greedy)")
    top_p: float | None = setting(None, help="nucleus sampling threshold in (0, 1]", default_text="off")
    top_k: int | None = setting(None, help="keep the k most likely tokens", default_text="off")
    seed: int | None = setting(None, help="per-request sampling seed", default_text="unseeded")
    ignore_eos: bool = setting(False, help="keep generating past the end-of-sequence token")
    tls_ca: str | None = setting(
        None, metavar="PEM", help="connect over TLS, trusting this CA (the server's --tls-cert issuer)",
        default_text="plaintext",
    )
    tls_client_cert: str | None = setting(None, metavar="PEM", help="mutual TLS: this client's certificate",
                                          default_text="none")
    tls_client_key: str | None = setting(None, metavar="PEM", help="mutual TLS: its private key", default_text="none")
    adapter: str = setting("", help="the LoRA adapter to answer with (a name ListAdapters gives)",
                           default_text="the base model")


class ClientError(Exception):
    """Ends a client command with this message on stderr and exit code 1."""


def sampling_from(config: ClientConfig, stop: Sequence[str]) -> pb.SamplingParams:
    sampling = pb.SamplingParams(
        temperature=config.temperature, max_tokens=config.max_tokens, stop=stop, ignore_eos=config.ignore_eos
    )
    for name in ("top_p", "top_k", "seed"):
        if getattr(config, name) is not None:
            setattr(sampling, name, getattr(config, name))
    return sampling


def call_metadata(config: ClientConfig) -> tuple[tuple[str, str], ...]:
    api_key = config.api_key or os.environ.get(API_KEY_ENV)
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class GenerationClient:
    """A channel to the scheduler that waits, within `config.timeout`, until it can generate.

    Nothing answering at the address within `CONNECT_SECONDS` is a ClientError at once; a server that
    answers but is not ready yet (its executor still loading) is waited for until the deadline.
    """

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        if config.tls_ca is not None or config.tls_client_cert is not None:
            credentials = channel_credentials(config.tls_ca, config.tls_client_cert, config.tls_client_key)
            self.channel = grpc.secure_channel(config.address, credentials)
        else:
            self.channel = grpc.insecure_channel(config.address)
        self.stub = pb_grpc.GenerationStub(self.channel)

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.channel.close()

    def wait_ready(self, deadline: float) -> None:
        connect_seconds = max(0.0, min(CONNECT_SECONDS, deadline - time.monotonic()))
        try:
            grpc.channel_ready_future(self.channel).result(timeout=connect_seconds)
        except grpc.FutureTimeoutError:
            raise ClientError(
                f"nothing listens at {self.config.address} (no answer within {connect_seconds:.0f} s); "
                "start a server with `pagewire serve` or pass --address HOST:PORT"
            ) from None
        health = health_pb2_grpc.HealthStub(self.channel)
        status = None
        while True:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(service=GENERATION_SERVICE),
                    timeout=5.0).status
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return  # no health service: try the call itself
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() + READY_POLL_SECONDS > deadline:
                raise ClientError(
                    f"the server at {self.config.address} is not ready after {self.config.timeout:g} s "
                    "(its executor is still loading or unreachable); raise --timeout or check its log"
                )
            time.sleep(READY_POLL_SECONDS)

    def generate(self, request: pb.GenerateRequest) -> Iterator[pb.GenerateResponse]:
        """Streams the responses of `request`; a server that turns unready before the first token is
        waited for again until the deadline. Other errors raise ClientError with the server's message."""
        deadline = time.monotonic() + self.config.timeout
        while True:
            self.wait_ready(deadline)
            started = False
            try:
                call = self.stub.Generate(
                    request, timeout=max(0.1,
                        deadline - time.monotonic()), metadata=call_metadata(self.config)
                )
                for response in call:
                    started = True
                    yield response
                return
            except grpc.RpcError as error:
                retry = error.code() == grpc.StatusCode.UNAVAILABLE and not started
                if not retry or time.monotonic() + READY_POLL_SECONDS > deadline:
                    raise ClientError(f"{error.code().name}: {error.details()}") from None
                time.sleep(READY_POLL_SECONDS)


def finish_note(response: pb.GenerateResponse) -> str:
    reason = pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
    return (
        f"[{reason}: {response.usage.prompt_tokens} prompt + "
        f"{response.usage.completion_tokens} completion tokens]"
    )


def stream_text(client: GenerationClient, request: pb.GenerateRequest, out: TextIO, err: TextIO) -> str:
    """Writes the answer to `out` as it streams and the finish note to `err`; returns the whole answer."""
    pieces = []
    for response in client.generate(request):
        out.write(response.text)
        out.flush()
        pieces.append(response.text)
        if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            print(f"\n{finish_note(response)}", file=err)
    return "".join(pieces)


def generate_to_stdout(config: ClientConfig, args: argparse.Namespace) -> int:
    """Streams the answer to `args.prompt` (as one user chat message with `args.chat`) to stdout."""
    sampling = sampling_from(config, args.stop)
    if args.chat:
        messages = [pb.ChatMessage(role="user", content=args.prompt)]
        if args.system:
            messages.insert(0, pb.ChatMessage(role="system", content=args.system))
        request = pb.GenerateRequest(messages=pb.ChatMessages(messages=messages), sampling=sampling,
                                     adapter=config.adapter)
    else:
        request = pb.GenerateRequest(text=args.prompt, sampling=sampling, adapter=config.adapter)
    with GenerationClient(config) as client:
        try:
            stream_text(client, request, sys.stdout, sys.stderr)
        except ClientError as error:
            print(f"\npagewire generate: {error}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    return 0
