"""The `pagewire` command: one entry point, a subcommand per job.

Each subcommand imports its service lazily, so `pagewire scheduler` never loads torch.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.logging_setup import configure_logging

if TYPE_CHECKING:
    from scheduler_service.engine_config import EngineConfig


def _parse_bytes(text: str) -> int:
    """'512MiB', '2GiB', '1e9' or a plain integer of bytes."""
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            return int(float(lowered[: -len(suffix)]) * factor)
    return int(float(lowered))


def _add_executor_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("executor", help="serve a model's tensors: weights, paged KV cache, forward")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--block-size", type=int, default=16)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--kv-cache-memory", type=_parse_bytes, default=None, help="bytes for the KV cache, e.g. 512MiB")
    size.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--num-gpu-blocks-override", type=int, default=None)
    p.add_argument("--swap-space", type=float, default=1.0, help="GiB of host memory for swapped-out blocks")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(handler=_run_executor)


def _run_executor(args: argparse.Namespace) -> int:
    from executor_service.executor_config import ExecutorConfig
    from executor_service.server import serve

    config = ExecutorConfig(
        model_dir=args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_device_blocks_override=args.num_gpu_blocks_override,
        swap_space_gib=args.swap_space,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_num_seqs=args.max_num_seqs,
        max_logprobs=args.max_logprobs,
        ops_backend=args.attention_backend,
        seed=args.seed,
        num_threads=args.num_threads,
    )
    asyncio.run(serve(config))
    return 0


def _add_create_tiny_model_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("create-tiny-model", help="write a small random Llama checkpoint with a tokenizer")
    p.add_argument("output_dir", metavar="DIR")
    p.add_argument("--seed", type=int, default=0, help="random weights are drawn from this seed")
    p.set_defaults(handler=_run_create_tiny_model)


def _run_create_tiny_model(args: argparse.Namespace) -> int:
    from executor_service.tiny_model import create_tiny_model

    print(create_tiny_model(args.output_dir, seed=args.seed))
    return 0


def _add_scheduler_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None, help="default: the executor's")
    p.add_argument("--max-queued-requests", type=int, default=1024)
    p.add_argument(
        "--preemption-mode", default="auto", choices=["auto", "recompute", "swap"],
        help="how a preempted request leaves the device; auto picks swap or recompute by measured cost",
    )
    p.add_argument(
        "--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
        help="share the KV blocks of common prompt prefixes between requests (default: on)",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the executor's model)")
    p.add_argument(
        "--max-plans-in-flight", type=int, default=2,
        help="plans sent ahead of their results (1: no overlap between scheduling and the forward)",
    )
    p.add_argument("--http-port", type=int, default=8000, help="OpenAI-compatible HTTP API and /metrics (0: off)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (HTTP and gRPC)")
    p.add_argument("--served-model-name", default=None, help="model name of the HTTP API (default: the checkpoint's)")


def _add_scheduler_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("scheduler", help="serve the public Generation API over one executor")
    p.add_argument("--executor", required=True, metavar="HOST:PORT")
    _add_scheduler_arguments(p)
    p.set_defaults(handler=_run_scheduler)


def _engine_config(args: argparse.Namespace, executor_address: str) -> EngineConfig:
    from scheduler_service.engine_config import EngineConfig

    return EngineConfig(
        executor_address=executor_address,
        host=args.host,
        port=args.port,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        max_queued_requests=args.max_queued_requests,
        preemption_mode=args.preemption_mode,
        enable_prefix_caching=args.enable_prefix_caching,
        tokenizer_dir=args.tokenizer,
        max_plans_in_flight=args.max_plans_in_flight,
        http_port=args.http_port,
        api_key=args.api_key,
        served_model_name=args.served_model_name,
    )


def _run_scheduler(args: argparse.Namespace) -> int:
    from scheduler_service.server import serve

    asyncio.run(serve(_engine_config(args, args.executor)))
    return 0


def _add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="start an executor and a scheduler together (the tiny model by default)")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tiny model, created on first use)")
    p.add_argument("--device", default="auto", help="executor device: auto, cpu or cuda[:N]")
    p.add_argument("--executor-port", type=int, default=50061)
    p.add_argument("--executor-args", default="", help="extra executor flags, quoted, e.g. '--kv-cache-memory 1GiB'")
    _add_scheduler_arguments(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from shared.serve import serve_both

    return serve_both(args, _engine_config(args, f"127.0.0.1:{args.executor_port}"))


def _add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="stream text for a prompt from a running server")
    p.add_argument("prompt")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server and the answer")
    p.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from shared.generate_client import generate_to_stdout

    return generate_to_stdout(args)


def _add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks: load a running server, or compare with transformers")
    kinds = p.add_subparsers(dest="bench_command", required=True)

    serve = kinds.add_parser("serve", help="send a workload to a running server and report serving metrics")
    serve.add_argument("--address", default="127.0.0.1:50051")
    serve.add_argument("--dataset", default="random", choices=["random", "shared-prefix", "sharegpt"])
    serve.add_argument("--num-prompts", type=int, default=100)
    serve.add_argument(
        "--input-len", default="32:256", help="N or MIN:MAX (uniform); for shared-prefix, the suffix"
    )
    serve.add_argument(
        "--output-len", default=None, help="N or MIN:MAX (default 64; sharegpt: each reply's length)"
    )
    serve.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: length of the prefix")
    serve.add_argument("--dataset-path", default=None, help="sharegpt: a local JSON file, ShareGPT layout")
    serve.add_argument("--tokenizer", default=None, help="sharegpt: the model's tokenizer directory")
    serve.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s, Poisson (default: all at once)"
    )
    serve.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument("--temperature", type=float, default=0.0)
    serve.add_argument("--ignore-eos", action="store_true", help="generate exactly the output length")
    serve.add_argument("--json", default=None, metavar="FILE", help="write every per-request figure here")
    serve.add_argument("--plot", default=None, metavar="FILE.png", help="latencies and throughput over time")
    serve.add_argument("--timeout", type=float, default=600.0, help="seconds for the server and each request")
    serve.add_argument("--no-progress", action="store_true")

    compare = kinds.add_parser("compare", help="the standard CPU comparison: pagewire vs transformers")
    compare.add_argument("--output-dir", default="benchmarks/results", help="where the JSON and the table go")
    compare.add_argument("--readme", default=None, help="a markdown file whose marked block gets the table")
    compare.add_argument("--threads", default="1,2", help="torch thread counts to try for every system")
    compare.add_argument("--num-requests", type=int, default=64)
    compare.add_argument(
        "--model-preset", default="standard", choices=["standard", "tiny"], help="tiny: a smoke run"
    )
    compare.add_argument("--overhead-sizes", default="1,16,64,256", help="running sequences to measure at")
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--repeat", type=int, default=1, help="runs per throughput figure; the best counts")

    def run_bench(args: argparse.Namespace) -> int:
        if args.bench_command == "serve":
            from benchmarks.serve_bench import run_serve_bench

            return run_serve_bench(args)
        from benchmarks.compare import run_compare

        return run_compare(args)

    p.set_defaults(handler=run_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagewire", description="pagewire LLM serving engine")
    parser.add_argument("--log-level", default="info")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_executor_parser(subparsers)
    _add_scheduler_parser(subparsers)
    _add_serve_parser(subparsers)
    _add_generate_parser(subparsers)
    _add_create_tiny_model_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, OSError) as error:
        print(f"pagewire {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
