"""Measures the memory features on real services: prefix caching on vs off on a shared-prefix workload,
and swap vs recompute vs auto preemption under memory pressure.

Run: `python -m benchmarks.memory_features [--quick] [--repeats N] [--json FILE]`. It builds the
benchmark Llama (random weights), starts one CPU executor per workload and one scheduler per run over it,
sends every request at once, and prints a markdown table per workload. The configurations of a workload
take turns, `--repeats` rounds, so that drift in a shared machine's speed hits them alike; each row is
the run of median duration, with every run's duration listed. Every run of a workload must produce the
same tokens (greedy): the benchmark fails otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from benchmarks.bench_model import BenchModelConfig, create_bench_model
from benchmarks.load_generator import LoadOptions, run_load
from benchmarks.metrics import compute_metrics
from benchmarks.processes import running_executor, running_scheduler
from benchmarks.workloads import BenchRequest, LengthRange, random_requests, shared_prefix_requests
from scheduler_service.executor_description import ExecutorDescription
from scheduler_service.preemption_policy import PreemptionPolicy
from shared.pb.pagewire.v1 import executor_pb2, executor_pb2_grpc
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc

BLOCK_SIZE = 16
PRESSURE_MAX_MODEL_LEN = 512
# A prompt no workload shares a block with: the warm-up must not seed the prefix cache.
WARM_UP_REQUEST = BenchRequest(max_tokens=4, prompt_token_ids=tuple(range(1, 9)))


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    requests: tuple[BenchRequest, ...]
    executor_args: tuple[str, ...]
    configurations: tuple[tuple[str, tuple[str, ...]], ...]  # (label, scheduler flags)


@dataclass(frozen=True, slots=True)
class RunResult:
    """One configuration's run; counters are the server's, minus the warm-up's."""

    label: str
    duration_s: float
    request_throughput: float
    output_throughput: float
    mean_ttft_ms: float
    prompt_tokens_computed: int
    prompt_tokens_cached: int
    preemptions_swap: int
    preemptions_recompute: int
    blocks_swapped_out: int
    tokens_recomputed: int
    output_token_ids: tuple[tuple[int, ...], ...]


COUNTERS = (
    "num_prompt_tokens_computed", "num_prompt_tokens_cached", "num_preemptions_swap",
    "num_preemptions_recompute", "num_blocks_swapped_out", "num_tokens_recomputed",
)


def server_counters(address: str) -> dict[str, int]:
    with grpc.insecure_channel(address) as channel:
        info = pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    return {name: getattr(info, name) for name in COUNTERS}


def run_configuration(
    executor_address: str,
    label: str,
    scheduler_args: Sequence[str],
    requests: Sequence[BenchRequest],
    log_dir: Path,
) -> RunResult:
    options = LoadOptions(temperature=0.0, ignore_eos=True)
    with running_scheduler(executor_address, scheduler_args, log_dir) as address:
        asyncio.run(run_load(address, [WARM_UP_REQUEST], [0.0], options))
        before = server_counters(address)
        result = asyncio.run(run_load(address, requests, [0.0] * len(requests), options))
        after = server_counters(address)
    failed = [record.error for record in result.records if not record.is_success]
    if failed:
        raise RuntimeError(f"{label}: {len(failed)} requests failed, e.g. {failed[0]}")
    metrics = compute_metrics(result.records, result.duration_s)
    delta = {name: after[name] - before[name] for name in COUNTERS}
    return RunResult(
        label=label,
        duration_s=metrics.duration_s,
        request_throughput=metrics.request_throughput,
        output_throughput=metrics.output_throughput,
        mean_ttft_ms=metrics.ttft.mean_ms or 0.0,
        prompt_tokens_computed=delta["num_prompt_tokens_computed"],
        prompt_tokens_cached=delta["num_prompt_tokens_cached"],
        preemptions_swap=delta["num_preemptions_swap"],
        preemptions_recompute=delta["num_preemptions_recompute"],
        blocks_swapped_out=delta["num_blocks_swapped_out"],
        tokens_recomputed=delta["num_tokens_recomputed"],
        output_token_ids=tuple(record.output_token_ids for record in result.records),
    )


def describe_executor(address: str) -> ExecutorDescription:
    with grpc.insecure_channel(address) as channel:
        message = executor_pb2_grpc.ExecutorStub(channel).Describe(executor_pb2.DescribeRequest(), timeout=10)
    return ExecutorDescription.from_pb(message)


def cost_line(description: ExecutorDescription) -> str:
    """What `--preemption-mode auto` compares per block of K/V, from the start-up measurements."""
    policy = PreemptionPolicy("auto", description.transfer_speeds)
    swap_ms = 1e3 * (policy.swap_seconds(1) or 0.0)
    recompute_ms = 1e3 * (policy.recompute_seconds(description.block_size) or 0.0)
    return (
        f"measured at executor start-up: {description.bytes_per_block / 1024:.0f} KiB per block, swap out "
        f"{description.swap_out_bytes_per_second / 1e9:.2f} GB/s, swap in "
        f"{description.swap_in_bytes_per_second / 1e9:.2f} GB/s, prefill "
        f"{description.prefill_tokens_per_second:.0f} tokens/s: per block, swap (out + in) ~ "
        f"{swap_ms:.3f} ms, recompute ~ {recompute_ms:.2f} ms"
    )


def run_workload(
    model_dir: Path, workload: Workload, num_threads: int, repeats: int, log_dir: Path
) -> list[list[RunResult]]:
    """Every configuration's runs, in configuration order."""
    runs: list[list[RunResult]] = [[] for _ in workload.configurations]
    with running_executor(model_dir, num_threads, workload.executor_args, log_dir) as executor_address:
        print(cost_line(describe_executor(executor_address)), flush=True)
        for round_index in range(repeats):
            for runs_of_one, (label, scheduler_args) in zip(runs, workload.configurations):
                print(f"  {workload.name} round {round_index + 1}: {label}", file=sys.stderr, flush=True)
                run = run_configuration(executor_address, label, scheduler_args, workload.requests, log_dir)
                runs_of_one.append(run)
    reference = runs[0][0]
    for result in (r for runs_of_one in runs for r in runs_of_one):
        if result.output_token_ids != reference.output_token_ids:
            raise RuntimeError(f"{workload.name}: {result.label} gave other tokens than {reference.label}")
    return runs


def median_run(runs: Sequence[RunResult]) -> RunResult:
    """The run of median duration (the faster of the middle two for an even count)."""
    return sorted(runs, key=lambda r: r.duration_s)[(len(runs) - 1) // 2]


def workloads(config: BenchModelConfig, quick: bool, seed: int) -> list[Workload]:
    num_shared = 8 if quick else 32
    shared = shared_prefix_requests(
        num_shared, prefix_len=512, suffix_len=LengthRange(32, 64), output_len=LengthRange(32, 32),
        vocab_size=config.vocab_size, seed=seed,
    )
    num_pressure = 8 if quick else 32
    pressure = random_requests(
        num_pressure, LengthRange(64, 256), LengthRange(128, 128), config.vocab_size, seed=seed + 1
    )
    pressure_flags = ("--max-model-len", str(PRESSURE_MAX_MODEL_LEN))
    # 64 blocks of 16 tokens hold about four of these requests at full length.
    pressure_blocks = str(PRESSURE_MAX_MODEL_LEN // BLOCK_SIZE * 2)
    return [
        Workload(
            name="shared-prefix",
            requests=tuple(shared),
            executor_args=(),
            configurations=(
                ("prefix caching off", ("--no-enable-prefix-caching",)),
                ("prefix caching on", ()),
            ),
        ),
        Workload(
            name="memory-pressure",
            requests=tuple(pressure),
            executor_args=("--num-gpu-blocks-override", pressure_blocks),
            configurations=tuple(
                (f"preemption {mode}", ("--preemption-mode", mode, *pressure_flags))
                for mode in ("recompute", "swap", "auto")
            ),
        ),
    ]


def format_table(workload: Workload, runs: Sequence[Sequence[RunResult]]) -> str:
    """A row per configuration: its median run, and the speed-up of its median duration over the first's."""
    baseline = median_run(runs[0]).duration_s
    lines = [
        f"{workload.name}: {len(workload.requests)} requests, all sent at once; executor flags: "
        f"`{' '.join(workload.executor_args) or '(defaults)'}`",
        "",
        "| configuration | duration s (median) | every run s | speed-up | req/s | output tok/s "
        "| mean TTFT ms | prompt tok computed | prompt tok cached | preempt swap / recompute "
        "| blocks swapped out | tok recomputed |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for runs_of_one in runs:
        r = median_run(runs_of_one)
        every = " / ".join(f"{run.duration_s:.1f}" for run in runs_of_one)
        lines.append(
            f"| {r.label} | {r.duration_s:.2f} | {every} | {baseline / r.duration_s:.2f}x "
            f"| {r.request_throughput:.2f} | {r.output_throughput:.1f} | {r.mean_ttft_ms:.0f} "
            f"| {r.prompt_tokens_computed} | {r.prompt_tokens_cached} "
            f"| {r.preemptions_swap} / {r.preemptions_recompute} | {r.blocks_swapped_out} "
            f"| {r.tokens_recomputed} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_features", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="8 requests per workload (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every configuration (default 3)")
    parser.add_argument(
        "--workload", action="append", choices=["shared-prefix", "memory-pressure"], default=None,
        help="run only this workload (repeatable; default: both)",
    )
    parser.add_argument("--threads", type=int, default=2, help="the executor's torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every figure here")
    args = parser.parse_args(argv)
    config = BenchModelConfig()
    with tempfile.TemporaryDirectory(prefix="pagewire-memory-bench-") as scratch:
        model_dir = create_bench_model(Path(scratch) / "model", config, seed=args.seed)
        log_dir = Path(scratch) / "logs"
        report: dict[str, list[dict[str, object]]] = {}
        for workload in workloads(config, args.quick, args.seed):
            if args.workload and workload.name not in args.workload:
                continue
            runs = run_workload(model_dir, workload, args.threads, args.repeats, log_dir)
            print(format_table(workload, runs) + "\n", flush=True)
            report[workload.name] = [
                {k: v for k, v in dataclasses.asdict(r).items() if k != "output_token_ids"}
                for runs_of_one in runs
                for r in runs_of_one
            ]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
