"""`pagewire bench lora`: multi-LoRA throughput against the base model, adapter load times, CPU SGMV."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import torch

from benchmarks.bench_model import BenchModelConfig, create_bench_model
from benchmarks.compare import TINY_MODEL
from benchmarks.load_generator import LoadOptions, to_pb, wait_until_ready
from benchmarks.lora_adapters import write_bench_adapter
from benchmarks.lora_report import (
    LoadTimes,
    ThroughputRun,
    adapter_name,
    adapters_for_requests,
    build_results,
    markdown_table,
)
from benchmarks.machine import describe_machine, load_average
from benchmarks.processes import running_executor, running_scheduler
from benchmarks.report import write_json
from benchmarks.sgmv_cpu_bench import DEFAULT_CASES, time_sgmv_cases
from benchmarks.workloads import BenchRequest, LengthRange, random_requests
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc

# Requests timing the first use of an adapter: a short prompt (under a block) and one output token.
PROBE_PROMPT = (11, 12, 13, 14, 15, 16, 17, 18)
NUM_LOAD_PROBES = 4


@dataclass(frozen=True, slots=True)
class LoraBenchConfig:
    """The standard multi-LoRA run; every field is part of what the results file reports."""

    model: BenchModelConfig = field(default_factory=BenchModelConfig)
    num_requests: int = 64
    prompt_len: LengthRange = LengthRange(32, 256)
    output_len: LengthRange = LengthRange(64, 64)
    adapter_counts: tuple[int, ...] = (0, 1, 8, 32)
    rank: int = 16
    seed: int = 0
    num_threads: int = 2
    rounds: int = 3
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048

    def __post_init__(self) -> None:
        if 0 not in self.adapter_counts or min(self.adapter_counts) < 0:
            raise ValueError(
                f"--adapters needs 0 (the base model) and counts >= 0, got {self.adapter_counts}"
            )
        if self.num_requests < 1 or self.rounds < 1 or self.num_threads < 1:
            raise ValueError("--num-requests, --rounds and --threads must be at least 1")

    @property
    def max_loras(self) -> int:
        return max(max(self.adapter_counts), 1)

    def requests(self) -> list[BenchRequest]:
        return random_requests(
            self.num_requests, self.prompt_len, self.output_len, self.model.vocab_size, self.seed
        )

    @property
    def executor_args(self) -> list[str]:
        return [
            "--block-size", str(self.block_size), "--num-gpu-blocks-override", str(self.num_kv_blocks),
            "--max-num-seqs", str(self.max_num_seqs), "--enable-lora", "--max-loras", str(self.max_loras),
            "--max-lora-rank", str(self.rank),
        ]

    @property
    def scheduler_args(self) -> list[str]:
        return [
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--enable-lora",
        ]


def parse_counts(text: str) -> tuple[int, ...]:
    """`--adapters 0,1,8,32`: comma-separated counts of distinct adapters, 0 = the base model."""
    try:
        counts = tuple(sorted({int(part) for part in text.split(",") if part.strip()}))
    except ValueError as error:
        raise ValueError(f"--adapters takes comma-separated integers, got {text!r}") from error
    return counts


def config_from_args(args: argparse.Namespace) -> LoraBenchConfig:
    return LoraBenchConfig(
        model=TINY_MODEL if args.model_preset == "tiny" else BenchModelConfig(),
        num_requests=args.num_requests,
        output_len=LengthRange(args.output_len, args.output_len),
        adapter_counts=parse_counts(args.adapters),
        seed=args.seed,
        num_threads=args.threads,
        rounds=args.rounds,
    )


def _say(message: str) -> None:
    print(f"[bench lora] {message}", file=sys.stderr, flush=True)


async def _generate(
    stub: pb_grpc.GenerationStub, request: BenchRequest, adapter: str, salt: str, request_id: str
) -> tuple[float, tuple[int, ...]]:
    """(seconds to the first token, output token ids) of one greedy request with EOS ignored."""
    message = to_pb(request, LoadOptions(temperature=0.0, ignore_eos=True), request_id)
    message.adapter = adapter
    message.cache_salt = salt
    started, first, token_ids = time.perf_counter(), None, []
    async for response in stub.Generate(message, timeout=600.0):
        if response.token_ids and first is None:
            first = time.perf_counter() - started
        token_ids.extend(response.token_ids)
        if response.finish_reason == pb.FINISH_REASON_ABORT:
            raise RuntimeError(f"request {request_id} was aborted")
    return (first if first is not None else time.perf_counter() - started), tuple(token_ids)


async def _throughput_pass(
    address: str, requests: list[BenchRequest], adapters: list[str], salt: str
) -> tuple[float, list[tuple[int, ...]]]:
    """All requests at once; (seconds to the last response, outputs in request order). A salt per
    pass keeps one pass's prefix-cache blocks from serving another's prompts."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        started = time.perf_counter()
        results = await asyncio.gather(*(
            _generate(stub, r, a, salt, f"{salt}-{i}") for i, (r, a) in enumerate(zip(requests, adapters))
        ))
        return time.perf_counter() - started, [tokens for _, tokens in results]


async def _register(address: str, adapter_dirs: list[Path]) -> LoadTimes:
    """LoadAdapter for every adapter, timed one by one."""
    samples = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for index, path in enumerate(adapter_dirs):
            started = time.perf_counter()
            request = pb.LoadAdapterRequest(name=adapter_name(index), path=str(path))
            await stub.LoadAdapter(request, timeout=60.0)
            samples.append((time.perf_counter() - started) * 1e3)
    return LoadTimes(tuple(samples))


async def _first_use_extra(address: str, num_probes: int) -> LoadTimes:
    """TTFT of the first request on an adapter (its load rides in that step's plan) minus the TTFT of
    the same request once the adapter is resident; prompts are salted so that neither hits the cache."""
    probe = BenchRequest(max_tokens=1, prompt_token_ids=PROBE_PROMPT)
    samples = []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        for index in range(num_probes):
            name = adapter_name(index)
            cold, _ = await _generate(stub, probe, name, f"cold-{index}", f"cold-{index}")
            warm = min([(await _generate(stub, probe, name, f"warm-{index}-{k}", f"warm-{index}-{k}"))[0]
                        for k in range(3)])
            samples.append(max(cold - warm, 0.0) * 1e3)
    return LoadTimes(tuple(samples))


def _executor_load_times(model_dir: Path, adapter_dirs: list[Path], rank: int) -> tuple[LoadTimes, LoadTimes]:
    """The executor's own load path in this process: (read + check + copy into a slot, for adapters
    not in the host cache; copy from the host cache). The files were just written, so they are in
    the OS page cache: a first read from a cold disk is not measured."""
    from executor_service.lora.adapter_host_cache import AdapterHostCache
    from executor_service.lora.lora_slots import LoraSlots
    from executor_service.model.config import ModelConfig

    model = ModelConfig.from_pretrained_dir(model_dir)
    cache = AdapterHostCache(model, rank, max_entries=None)
    slots = LoraSlots(model, max_loras=1, max_lora_rank=rank, dtype=torch.float32, device="cpu")
    cold, cached = [], []
    for times in (cold, cached):
        for index, path in enumerate(adapter_dirs):
            started = time.perf_counter()
            slots.load(0, adapter_name(index), str(path), cache.get(adapter_name(index), str(path)))
            times.append((time.perf_counter() - started) * 1e3)
    assert cache.num_reads == len(adapter_dirs) and cache.num_hits == len(adapter_dirs)
    return LoadTimes(tuple(cold)), LoadTimes(tuple(cached))


def _sgmv_microbench(model_dir: Path, num_threads: int = 1) -> list[dict[str, object]]:
    """Torch reference vs CpuOps on one thread: on a shared 2-core machine two OpenMP threads make
    micro-timings swing tenfold; one thread gives the per-core cost."""
    from executor_service.model.config import ModelConfig
    from executor_service.ops.cpu_ops import CpuOps
    from executor_service.ops.torch_ops import TorchOps

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        model = ModelConfig.from_pretrained_dir(model_dir)
        timings = time_sgmv_cases(TorchOps(), CpuOps(), model, DEFAULT_CASES)
    finally:
        torch.set_num_threads(previous)
    for t in timings:
        _say(
            f"SGMV {t.case}: torch {t.torch_ms:.2f} ms, cpu kernel {t.cpu_ms:.2f} ms per layer "
            f"({t.speedup:.1f}x)"
        )
    return [t.summary() for t in timings]


def _serve_runs(
    config: LoraBenchConfig, model_dir: Path, adapter_dirs: list[Path], log_dir: Path,
    load_ms: dict[str, LoadTimes],
) -> list[ThroughputRun]:
    """LoadAdapter for every adapter, first-use probes, a warm-up that puts every adapter in its slot,
    then `rounds` rounds in which the adapter counts take turns (a noisy moment hits them alike)."""
    requests = config.requests()
    runs: list[ThroughputRun] = []
    with running_executor(model_dir, config.num_threads, config.executor_args, log_dir) as executor:
        with running_scheduler(executor, config.scheduler_args, log_dir) as address:
            asyncio.run(wait_until_ready(address, 120.0))
            if adapter_dirs:
                load_ms["load_adapter_rpc"] = asyncio.run(_register(address, adapter_dirs))
                load_ms["first_request_extra"] = asyncio.run(
                    _first_use_extra(address, min(NUM_LOAD_PROBES, len(adapter_dirs)))
                )
            # Every adapter into its slot before the timed passes, so they measure serving, not loading.
            warm = [BenchRequest(max_tokens=2, prompt_token_ids=PROBE_PROMPT)] * max(len(adapter_dirs), 1)
            warm_adapters = adapters_for_requests(len(adapter_dirs), len(warm))
            asyncio.run(_throughput_pass(address, warm, warm_adapters, "warm"))
            base_outputs: list[tuple[int, ...]] = []
            for round_index in range(config.rounds):
                for count in config.adapter_counts:
                    adapters = adapters_for_requests(count, len(requests))
                    duration, outputs = asyncio.run(
                        _throughput_pass(address, requests, adapters, f"r{round_index}-n{count}")
                    )
                    if count == 0:
                        base_outputs = base_outputs or outputs
                    changed = sum(a != b for a, b in zip(outputs, base_outputs)) if count else 0
                    runs.append(ThroughputRun(count, round_index, duration, sum(map(len, outputs)), changed))
                    _say(
                        f"round {round_index}, {count} adapters: "
                        f"{runs[-1].output_tokens_per_s:.1f} output tok/s ({duration:.1f} s, "
                        f"load {load_average()})"
                    )
    return runs


def _command(args: argparse.Namespace) -> str:
    return (
        f"pagewire bench lora --adapters {args.adapters} --num-requests {args.num_requests} "
        f"--output-len {args.output_len} --rounds {args.rounds} --threads {args.threads} "
        f"--model-preset {args.model_preset} --seed {args.seed}"
    )


def run_lora_bench(args: argparse.Namespace) -> int:
    """Runs every phase; prints the table (or the JSON with --json) and writes lora.json/lora.md."""
    config = config_from_args(args)
    started = time.monotonic()
    machine = describe_machine()
    with tempfile.TemporaryDirectory(prefix="pagewire-bench-lora-") as scratch:
        root = Path(scratch)
        model_dir = create_bench_model(root / "model", config.model)
        adapter_dirs = [
            write_bench_adapter(
                model_dir, root / "adapters" / adapter_name(i), rank=config.rank, seed=1000 + i
            )
            for i in range(max(config.adapter_counts))
        ]
        sgmv = [] if args.skip_sgmv else _sgmv_microbench(model_dir)
        load_ms: dict[str, LoadTimes] = {}
        timed_dirs = adapter_dirs or [write_bench_adapter(model_dir, root / "one", rank=config.rank, seed=1)]
        load_ms["executor_cold"], load_ms["executor_host_cache"] = _executor_load_times(
            model_dir, timed_dirs, config.rank
        )
        runs = _serve_runs(config, model_dir, adapter_dirs, root / "logs", load_ms)
    machine["load_average_at_end"] = load_average()
    machine["wall_s"] = round(time.monotonic() - started, 1)
    config_dict = {**asdict(config), "model": asdict(config.model)}
    results = build_results(config_dict, machine, runs, config.num_requests, load_ms, sgmv, _command(args))
    output_dir = Path(args.output_dir)
    write_json(output_dir / "lora.json", results)
    table = markdown_table(results)
    (output_dir / "lora.md").write_text(table + "\n", encoding="utf-8")
    print(json.dumps(results, indent=2) if args.json else table)
    _say(f"done in {machine['wall_s']:.0f} s; results in {output_dir}")
    return 0
