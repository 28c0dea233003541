"""`pagewire bench spec`: speculative decoding off / ngram / draft model on the default model, copy and
chat workloads, at several concurrencies: TPOT, output throughput and acceptance per draft position."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from benchmarks.load_generator import LoadOptions, run_load, wait_until_ready, warm_up
from benchmarks.machine import describe_machine, load_average
from benchmarks.metrics import compute_metrics
from benchmarks.processes import running_executor, running_scheduler
from benchmarks.report import write_json
from benchmarks.spec_report import (
    DRAFT_MODEL,
    NGRAM,
    OFF,
    OFF_NO_OVERLAP,
    DraftCounters,
    SpecRun,
    best_rows,
    copied_fraction,
    markdown_table,
    targets,
    targets_markdown,
)
from benchmarks.spec_workloads import COPY, WORKLOADS, ChatPrompts, conversations, passages
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc

CONFIGS = (OFF, NGRAM, DRAFT_MODEL, OFF_NO_OVERLAP)


@dataclass(frozen=True, slots=True)
class SpecBenchConfig:
    """The standard run; every field is part of what the results file reports. At a batch size of
    `loaded_batch_size` or more, outputs are `loaded_output_len` long (the whole run stays short)."""

    num_speculative_tokens: int = 4
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    # Batch 1 sends this many requests one after the other; a batch of B sends B at once.
    num_requests_at_batch_1: int = 2
    output_len: int = 96
    loaded_batch_size: int = 64
    loaded_output_len: int = 48
    workloads: tuple[str, ...] = WORKLOADS
    # OFF first: every other configuration is compared with it.
    configs: tuple[str, ...] = (OFF, NGRAM)
    seed: int = 0
    num_threads: int = 2
    # Rounds in which the configurations take turns (each round in a rotated order); the best counts.
    rounds: int = 1
    kv_cache_memory: str = "1GiB"
    # The draft_model configuration's draft checkpoint (`pagewire create-draft-model`).
    draft_model: str | None = None

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"--batch-sizes must be positive integers, got {self.batch_sizes}")
        if self.rounds < 1:
            raise ValueError(f"--rounds must be at least 1, got {self.rounds}")
        if min(self.output_len, self.loaded_output_len, self.num_requests_at_batch_1, self.num_threads) < 2:
            raise ValueError(
                "--output-len, --loaded-output-len, --requests-at-batch-1 and --threads must be at least 2"
            )
        unknown = set(self.workloads) - set(WORKLOADS)
        if unknown:
            raise ValueError(f"unknown --workloads {sorted(unknown)}; use {', '.join(WORKLOADS)}")
        if not self.configs or self.configs[0] != OFF or not set(self.configs) <= set(CONFIGS):
            raise ValueError(
                f"--configs must start with off and name only {', '.join(CONFIGS)}, got {self.configs}"
            )
        if DRAFT_MODEL in self.configs and not self.draft_model:
            raise ValueError("--configs draft_model needs --draft-model DIR (e.g. from `pagewire create-draft-model "
                             "default DIR --num-layers 8`)")

    @property
    def ngram_config(self) -> str:
        return json.dumps({"method": "ngram", "num_speculative_tokens": self.num_speculative_tokens})

    @property
    def draft_model_config(self) -> str:
        return json.dumps({"method": "draft_model", "model": self.draft_model,
                           "num_speculative_tokens": self.num_speculative_tokens})

    @property
    def not_run(self) -> dict[str, str]:
        """Speculative configurations left out of this run, and why."""
        return {} if DRAFT_MODEL in self.configs else {DRAFT_MODEL: "not in --configs (needs --draft-model DIR)"}

    def scheduler_args(self, config: str) -> list[str]:
        """No prefix caching: every run (and every round) computes its prompts, whatever ran before."""
        args = ["--no-enable-prefix-caching"]
        if config == NGRAM:
            return [*args, "--speculative-config", self.ngram_config]
        if config == DRAFT_MODEL:
            return [*args, "--speculative-config", self.draft_model_config]
        return [*args, "--max-plans-in-flight", "1"] if config == OFF_NO_OVERLAP else args

    def executor_args(self, config: str) -> list[str]:
        args = ["--kv-cache-memory", self.kv_cache_memory]
        return [*args, "--speculative-config", self.draft_model_config] if config == DRAFT_MODEL else args

    def num_requests(self, batch_size: int) -> int:
        return self.num_requests_at_batch_1 if batch_size == 1 else batch_size

    def output_len_at(self, batch_size: int) -> int:
        return self.loaded_output_len if batch_size >= self.loaded_batch_size else self.output_len


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """`--batch-sizes 1,16,64`: comma-separated concurrencies, kept in ascending order."""
    try:
        return tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as error:
        raise ValueError(f"--batch-sizes takes comma-separated integers, got {text!r}") from error


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def config_from_args(args: argparse.Namespace) -> SpecBenchConfig:
    return SpecBenchConfig(
        num_speculative_tokens=args.num_speculative_tokens,
        batch_sizes=parse_batch_sizes(args.batch_sizes),
        num_requests_at_batch_1=args.requests_at_batch_1,
        output_len=args.output_len,
        loaded_output_len=args.loaded_output_len,
        workloads=_names(args.workloads),
        configs=_names(args.configs),
        seed=args.seed,
        num_threads=args.threads,
        rounds=args.rounds,
        draft_model=args.draft_model,
    )


def _say(message: str) -> None:
    print(f"[bench spec] {message}", file=sys.stderr, flush=True)


async def _counters(address: str) -> DraftCounters:
    async with grpc.aio.insecure_channel(address) as channel:
        info = await pb_grpc.GenerationStub(channel).GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    return DraftCounters.of(info)


def _one_run(
    address: str, config: str, workload: str, batch_size: int, bench: SpecBenchConfig, prompts: ChatPrompts,
    round_index: int,
) -> tuple[SpecRun, list[tuple[int, ...]]]:
    """Greedy, EOS ignored, `batch_size` requests in flight at most; counters differenced around it."""
    num_requests, output_len = bench.num_requests(batch_size), bench.output_len_at(batch_size)
    requests = prompts.requests(conversations(workload, num_requests, bench.seed), output_len)
    options = LoadOptions(temperature=0.0, ignore_eos=True, max_concurrency=batch_size, timeout_s=900.0)
    before = asyncio.run(_counters(address))
    result = asyncio.run(run_load(address, requests, [0.0] * len(requests), options))
    drafts = asyncio.run(_counters(address)) - before
    outputs = [record.output_token_ids for record in result.records]
    copied = None
    if workload == COPY:
        fractions = [
            copied_fraction(prompts.tokenizer.decode(tokens), passage)
            for tokens, passage in zip(outputs, passages(num_requests, bench.seed))
        ]
        copied = sum(fractions) / len(fractions)
    metrics = compute_metrics(result.records, result.duration_s)
    run = SpecRun(
        config, workload, batch_size, num_requests, output_len, metrics, drafts, copied, round_index
    )
    return run, outputs


def _progress_line(run: SpecRun) -> str:
    row = run.summary()
    return (
        f"round {run.round_index} {run.workload} batch {run.batch_size} {run.config}: TPOT "
        f"{row['mean_tpot_ms']} ms, {row['output_tokens_per_s']} tok/s, acceptance {row['acceptance_rate']} "
        f"{row['acceptance_per_position']} ({row['duration_s']} s, load {load_average()})"
    )


def _serve_runs(bench: SpecBenchConfig, model: Path, log_dir: Path) -> tuple[list[SpecRun], dict[str, int]]:
    """One server per configuration, all up at once, runs in turns (each configuration per workload and
    batch size, the order rotated every round), so that a noisy moment on a shared machine hits them
    alike. Returns the runs and, per (config, workload, batch), how many outputs differ from off's in
    any round (greedy: should be 0)."""
    prompts = ChatPrompts.for_model(model)
    runs: list[SpecRun] = []
    mismatches: dict[str, int] = {}
    with ExitStack() as stack:
        addresses = {}
        for config in bench.configs:
            executor = stack.enter_context(
                running_executor(model, bench.num_threads, bench.executor_args(config), log_dir)
            )
            addresses[config] = stack.enter_context(
                running_scheduler(executor, bench.scheduler_args(config), log_dir)
            )
        for config, address in addresses.items():
            asyncio.run(wait_until_ready(address, 300.0))
            warm = prompts.requests(conversations(COPY, 1, bench.seed), 8)[0]
            asyncio.run(warm_up(address, warm, LoadOptions(temperature=0.0, ignore_eos=True)))
        for round_index, workload, batch_size in (
            (r, w, b) for r in range(bench.rounds) for w in bench.workloads for b in bench.batch_sizes
        ):
            shift = round_index % len(bench.configs)
            outputs = {}
            for config in (*bench.configs[shift:], *bench.configs[:shift]):
                run, outputs[config] = _one_run(
                    addresses[config], config, workload, batch_size, bench, prompts, round_index
                )
                runs.append(run)
                _say(_progress_line(run))
            for config in bench.configs[1:]:
                key = f"{config}/{workload}/{batch_size}"
                mismatches[key] = mismatches.get(key, 0) + sum(
                    a != b for a, b in zip(outputs[OFF], outputs[config])
                )
    return runs, mismatches


def _commit() -> str:
    """HEAD, and `+dirty` when the working tree differs from it (the run measured the tree)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parents[1],
                              capture_output=True, text=True, check=False)
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return f"{head}+dirty" if head and git("status", "--porcelain", "--untracked-files=no") else head


def _command(args: argparse.Namespace) -> str:
    return (
        f"pagewire bench spec --batch-sizes {args.batch_sizes} --workloads {args.workloads} "
        f"--configs {args.configs} "
        f"--output-len {args.output_len} --loaded-output-len {args.loaded_output_len} "
        f"--requests-at-batch-1 {args.requests_at_batch_1} --num-speculative-tokens "
        f"{args.num_speculative_tokens} --threads {args.threads} --rounds {args.rounds} --seed {args.seed}"
    )


def run_spec_bench(args: argparse.Namespace) -> int:
    """Runs every configuration; prints the table (or JSON with --json) and writes spec.json/spec.md."""
    from pagewire.default_model import default_model

    bench = config_from_args(args)
    model = Path(args.model) if args.model else default_model()
    started = time.monotonic()
    commit = _commit()  # before the servers start: what they run
    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="pagewire-bench-spec-") as scratch:
        runs, mismatches = _serve_runs(bench, model, Path(scratch) / "logs")
    machine["load_average_at_end"] = load_average()
    machine["wall_s"] = round(time.monotonic() - started, 1)
    rows = [run.summary() for run in runs]
    checks = targets(best_rows(rows), COPY, max(bench.batch_sizes))
    results = {
        "command": _command(args),
        "commit": commit,
        "model": model.name,
        "config": asdict(bench),
        "machine": machine,
        "runs": rows,
        "not_run": bench.not_run,
        "outputs_differing_from_off": mismatches,
        "targets": checks,
    }
    output_dir = Path(args.output_dir)
    write_json(output_dir / "spec.json", results)
    text = f"{markdown_table(rows, bench.not_run)}\n\n{targets_markdown(checks)}"
    (output_dir / "spec.md").write_text(text + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2) if args.json else text)
    _say(f"done in {machine['wall_s']:.0f} s; results in {output_dir}")
    return 0
