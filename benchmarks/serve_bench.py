"""`pagewire bench serve`: load a running server with a workload and report vLLM-style serving metrics."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
from typing import Any

from benchmarks.arrivals import arrival_offsets
from benchmarks.load_generator import LoadOptions, LoadResult, run_load, wait_until_ready, warm_up
from benchmarks.metrics import compute_metrics
from benchmarks.progress import ProgressBar
from benchmarks.report import format_summary, serve_result, write_json
from benchmarks.workloads import (
    BenchRequest,
    LengthRange,
    random_requests,
    shared_prefix_requests,
    sharegpt_requests,
)
from pagewire.generate_client import API_KEY_ENV
from shared.pb.pagewire.v1 import generate_pb2 as pb

DEFAULT_OUTPUT_LEN = "64"


def build_requests(args: argparse.Namespace, vocab_size: int) -> list[BenchRequest]:
    """The workload named by `--dataset`; random token ids are drawn from the server's vocabulary.

    `--output-len` defaults to DEFAULT_OUTPUT_LEN for generated workloads and to each reply's length for
    ShareGPT (where a value fixes every output length instead).
    """
    output_len = LengthRange.parse(args.output_len or DEFAULT_OUTPUT_LEN)
    if args.dataset == "random":
        return random_requests(
            args.num_prompts, LengthRange.parse(args.input_len), output_len, vocab_size, args.seed
        )
    if args.dataset == "shared-prefix":
        return shared_prefix_requests(
            args.num_prompts,
            args.prefix_len,
            LengthRange.parse(args.input_len),
            output_len,
            vocab_size,
            args.seed,
        )
    if args.dataset == "sharegpt":
        if not args.dataset_path or not args.tokenizer:
            raise ValueError(
                "--dataset sharegpt needs --dataset-path FILE.json and --tokenizer DIR (the model's)"
            )
        fixed_output = output_len.low if args.output_len else None
        return sharegpt_requests(args.dataset_path, args.tokenizer, args.num_prompts, args.seed, fixed_output)
    raise ValueError(f"unknown --dataset {args.dataset!r}; use random, shared-prefix or sharegpt")


def _server_summary(info: pb.ServerInfo) -> dict[str, Any]:
    return {
        "model_name": info.model_name,
        "executor_device": info.executor_device,
        "max_model_len": info.max_model_len,
        "block_size": info.block_size,
        "num_device_blocks": info.num_device_blocks,
        "vocab_size": info.vocab_size,
    }


def _config(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "address",
        "dataset",
        "num_prompts",
        "input_len",
        "output_len",
        "prefix_len",
        "dataset_path",
        "request_rate",
        "max_concurrency",
        "seed",
        "temperature",
        "ignore_eos",
    )
    config = {name: getattr(args, name) for name in names}
    config["request_rate"] = "inf" if math.isinf(args.request_rate) else args.request_rate
    return config


async def _serve_bench(args: argparse.Namespace) -> tuple[pb.ServerInfo, LoadResult]:
    options = LoadOptions(
        temperature=args.temperature,
        ignore_eos=args.ignore_eos,
        seed=None if args.temperature == 0 else args.seed,
        max_concurrency=args.max_concurrency,
        timeout_s=args.timeout,
        api_key=args.api_key or os.environ.get(API_KEY_ENV),
        tls_ca=args.tls_ca,
        tls_client_cert=args.tls_client_cert,
        tls_client_key=args.tls_client_key,
    )
    info = await wait_until_ready(args.address, args.timeout, options)
    requests = build_requests(args, info.vocab_size)
    await warm_up(args.address, requests[0], options)
    offsets = arrival_offsets(len(requests), args.request_rate, args.seed)
    progress = ProgressBar(len(requests), "requests", enabled=not args.no_progress)
    return info, await run_load(args.address, requests, offsets, options, progress)


def run_serve_bench(args: argparse.Namespace) -> int:
    """Runs the benchmark, prints the summary, writes `--json` and `--plot`; 1 when every request failed."""
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    info, result = asyncio.run(_serve_bench(args))
    metrics = compute_metrics(result.records, result.duration_s)
    print(format_summary(metrics))
    failures = [r for r in result.records if not r.is_success]
    if failures:
        print(f"{len(failures)} requests failed; first error: {failures[0].error}")
    if args.json:
        write_json(args.json, serve_result(_config(args), _server_summary(info), result.records, metrics))
    if args.plot:
        from benchmarks.plot import write_plot

        write_plot(
            args.plot,
            result.records,
            f"pagewire bench serve: {args.dataset}, {metrics.num_completed} requests",
        )
    return 1 if metrics.num_completed == 0 else 0
