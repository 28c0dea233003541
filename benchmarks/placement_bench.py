"""Prefix-aware placement against round robin, on real CPU executors: a multi-tenant workload whose
tenants each share a long system prompt, over executors whose KV pools hold only part of the tenants'
prefixes at once.

`python -m benchmarks.placement_bench [--executors 3] [--tenants 12] [--requests-per-tenant 16]`

For each policy (`--placement-policy cache-aware`, then `round-robin`), fresh executor processes (the
tiny model, one torch thread each, `--num-gpu-blocks-override` blocks) and one scheduler; the client
sends every request with at most `--max-concurrency` in flight, tenants interleaved at random (the same
order for both policies). Reported per policy: the prompt tokens the executors' prefix caches supplied
(hit rate = cached / all prompt tokens; the best possible, one miss per tenant, is printed beside it),
prompt tokens computed, requests placed per executor, wall time and output tokens/s. Greedy tokens of
both policies are compared request by request (they must be equal: placement changes where, not what).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from benchmarks.machine import describe_machine
from benchmarks.processes import running_executor, running_scheduler
from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc

POLICIES = ("cache-aware", "round-robin")


@dataclass(frozen=True, slots=True)
class PolicyResult:
    policy: str
    num_prompt_tokens: int
    num_prompt_tokens_cached: int
    num_prompt_tokens_computed: int
    requests_per_executor: list[int]
    seconds: float
    output_tokens_per_second: float

    @property
    def hit_rate(self) -> float:
        return self.num_prompt_tokens_cached / self.num_prompt_tokens


def workload(args: argparse.Namespace) -> list[list[int]]:
    """Tenant t's requests: its prefix, then a suffix of its own; tenants interleaved at random."""
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(3, 256) for _ in range(args.prefix_len)] for _ in range(args.tenants)]
    order = [t for t in range(args.tenants) for _ in range(args.requests_per_tenant)]
    rng.shuffle(order)
    return [prefixes[t] + [rng.randrange(3, 256) for _ in range(args.suffix_len)] for t in order]


async def send_all(address: str, prompts: list[list[int]], args: argparse.Namespace) -> list[list[int]]:
    limit = asyncio.Semaphore(args.max_concurrency)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)

        async def one(prompt: list[int]) -> list[int]:
            async with limit:
                request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=pb.SamplingParams(
                    temperature=0.0, max_tokens=args.output_len, ignore_eos=True))
                return [t async for r in stub.Generate(request, timeout=600) for t in r.token_ids]

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def server_info(address: str) -> pb.ServerInfo:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)


def run_policy(policy: str, model: Path, prompts: list[list[int]], args: argparse.Namespace,
               log_dir: Path) -> tuple[PolicyResult, list[list[int]]]:
    with ExitStack() as stack:
        executor_args = ["--num-gpu-blocks-override", str(args.blocks_per_executor)]
        executors = [stack.enter_context(running_executor(model, 1, executor_args, log_dir))
                     for _ in range(args.executors)]
        extra = [a for e in executors[1:] for a in ("--executor", e)]
        address = stack.enter_context(running_scheduler(
            executors[0], [*extra, "--placement-policy", policy, "--max-num-seqs", str(args.max_concurrency),
                           "--max-model-len", "512"],
            log_dir))
        while sum(e.ready for e in server_info(address).executors) < args.executors:
            time.sleep(0.2)
        started = time.perf_counter()
        outputs = asyncio.run(send_all(address, prompts, args))
        seconds = time.perf_counter() - started
        info = server_info(address)
    result = PolicyResult(
        policy=policy,
        num_prompt_tokens=sum(len(p) for p in prompts),
        num_prompt_tokens_cached=info.num_prompt_tokens_cached,
        num_prompt_tokens_computed=info.num_prompt_tokens_computed,
        requests_per_executor=[e.num_requests_placed for e in info.executors],
        seconds=seconds,
        output_tokens_per_second=sum(len(o) for o in outputs) / seconds,
    )
    return result, outputs


def format_table(results: list[PolicyResult], best_hit_rate: float) -> str:
    lines = [
        "| placement | prompt tokens cached | hit rate (best possible) | prompt tokens computed | requests per executor "
        "| wall s | output tok/s |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r.policy} | {r.num_prompt_tokens_cached:,} of {r.num_prompt_tokens:,} | {r.hit_rate:.1%} "
            f"({best_hit_rate:.1%}) | {r.num_prompt_tokens_computed:,} | {', '.join(map(str, r.requests_per_executor))} "
            f"| {r.seconds:.1f} | {r.output_tokens_per_second:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executors", type=int, default=3)
    parser.add_argument("--tenants", type=int, default=12)
    parser.add_argument("--requests-per-tenant", type=int, default=16)
    parser.add_argument("--prefix-len", type=int, default=256, help="each tenant's shared system prompt")
    parser.add_argument("--suffix-len", type=int, default=32, help="each request's own part")
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--max-concurrency", type=int, default=24)
    parser.add_argument("--blocks-per-executor", type=int, default=160,
                        help="KV blocks of 16 per executor: a third of the tenants' prefixes plus the running requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--log-dir", default="benchmarks/results/placement_logs")
    args = parser.parse_args()
    log_dir = Path(args.log_dir)
    model = create_tiny_model(log_dir / "tiny", seed=0)
    prompts = workload(args)
    results, outputs = [], []
    for policy in POLICIES:
        result, tokens = run_policy(policy, model, prompts, args, log_dir)
        results.append(result)
        outputs.append(tokens)
        print(f"{policy}: hit rate {result.hit_rate:.1%}, {result.seconds:.1f} s", flush=True)
    num_requests = len(prompts)
    best = (num_requests - args.tenants) * args.prefix_len // 16 * 16 / sum(len(p) for p in prompts)
    equal = sum(a == b for a, b in zip(*outputs, strict=True))
    print(format_table(results, best))
    print(f"greedy tokens equal between the policies: {equal}/{num_requests}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": describe_machine(), "config": vars(args), "best_hit_rate": best,
            "tokens_equal": equal, "results": [asdict(r) | {"hit_rate": r.hit_rate} for r in results],
        }, indent=2) + "\n")
    return 0 if equal == num_requests else 1


if __name__ == "__main__":
    raise SystemExit(main())
