"""`pagewire generate`: a small streaming client of the public Generation API."""

from __future__ import annotations

import argparse
import sys

import grpc

from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc


def generate_to_stdout(args: argparse.Namespace) -> int:
    """Streams the completion of `args.prompt` to stdout; returns a process exit code."""
    sampling = pb.SamplingParams(
        temperature=args.temperature, max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos
    )
    for name in ("top_p", "top_k", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    request = pb.GenerateRequest(text=args.prompt, sampling=sampling)
    with grpc.insecure_channel(args.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            for response in stub.Generate(request, timeout=args.timeout, wait_for_ready=True):
                sys.stdout.write(response.text)
                sys.stdout.flush()
                if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    reason = pb.FinishReason.Name(response.finish_reason).removeprefix("FINISH_REASON_").lower()
                    print(
                        f"\n[{reason}: {response.usage.prompt_tokens} prompt + "
                        f"{response.usage.completion_tokens} completion tokens]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as error:
            print(f"\npagewire generate: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    sys.stdout.write("\n")
    return 0
