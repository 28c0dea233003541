"""`pagewire bench compare` (`make bench`): pagewire against transformers, and vLLM, on this CPU."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.bench_model import BenchModelConfig, create_bench_model
from benchmarks.compare_markdown import markdown_report, update_readme
from benchmarks.compare_report import CompareMeasurements, build_results
from benchmarks.engine_probe import run_engine_probe
from benchmarks.hf_baselines import (
    ContinuousBatchingSettings,
    RunTooSlow,
    load_hf_model,
    run_generate_batch,
    run_static_generate,
)
from benchmarks.kv_memory import kv_waste
from benchmarks.load_generator import LoadOptions, LoadResult, run_load, wait_until_ready, warm_up
from benchmarks.machine import describe_machine, load_average
from benchmarks.metrics import BenchmarkMetrics, compute_metrics
from benchmarks.overhead import overhead_requests, summarize_overhead
from benchmarks.processes import running_executor, running_scheduler
from benchmarks.report import metrics_to_dict, write_json
from benchmarks.roofline import measure_matmul_flops
from benchmarks.system_run import HF_GENERATE, PAGEWIRE, VLLM_CPU, SystemRun
from benchmarks.vllm_baseline import (
    VLLM_BLOCK_SIZE,
    VLLM_HEAD_SIZES,
    VllmEngineSettings,
    VllmPeers,
    vllm_environment,
)
from benchmarks.workloads import BenchRequest, LengthRange, random_requests

TINY_MODEL = BenchModelConfig(
    num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_heads=2, intermediate_size=176, vocab_size=512
)
WORKLOAD_A = "A"
WORKLOAD_B = "B"
Workloads = dict[str, list[BenchRequest]]
# A static-generate run over this many times the first thread count's duration is abandoned: on a shared
# 2-core machine, two OpenMP threads competing with other processes can run ten times slower.
SLOWDOWN_LIMIT = 3.0
# Systems `--peers` can add to the comparison (each needs its own environment).
PEER_VLLM = "vllm"
KNOWN_PEERS = (PEER_VLLM,)


@dataclass(frozen=True, slots=True)
class CompareConfig:
    """The standard comparison; every field is part of what the results file reports."""

    model: BenchModelConfig = field(default_factory=BenchModelConfig)
    model_seed: int = 0
    num_requests: int = 64
    prompt_len: LengthRange = LengthRange(32, 256)
    output_len_a: LengthRange = LengthRange(64, 64)
    output_len_b: LengthRange = LengthRange(16, 256)
    seed: int = 0
    thread_counts: tuple[int, ...] = (1, 2)
    static_batch_size: int = 16
    block_size: int = 16
    num_kv_blocks: int = 2048
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    overhead_sizes: tuple[int, ...] = (1, 16, 64, 256)
    # Rounds of workload A per (system, thread count); the best round counts.
    repeat: int = 1
    # Other systems to compare with (KNOWN_PEERS); none by default, so `make bench` needs only .venv.
    peers: tuple[str, ...] = ()
    hf_batching: ContinuousBatchingSettings = field(default_factory=ContinuousBatchingSettings)

    def workloads(self) -> Workloads:
        """A and B share their prompts (same seed and prompt range); only the output lengths differ."""
        vocab = self.model.vocab_size
        return {
            WORKLOAD_A: random_requests(
                self.num_requests, self.prompt_len, self.output_len_a, vocab, self.seed
            ),
            WORKLOAD_B: random_requests(
                self.num_requests, self.prompt_len, self.output_len_b, vocab, self.seed
            ),
        }

    @property
    def executor_args(self) -> list[str]:
        return [
            "--block-size",
            str(self.block_size),
            "--num-gpu-blocks-override",
            str(self.num_kv_blocks),
            "--max-num-seqs",
            str(self.max_num_seqs),
        ]

    def vllm_settings(self, model_dir: Path) -> VllmEngineSettings:
        """vLLM with pagewire's KV cache bytes (in its own block size) and batch limits."""
        return VllmEngineSettings(
            model_dir=str(model_dir),
            block_size=VLLM_BLOCK_SIZE,
            kv_cache_bytes=self.num_kv_blocks * self.block_size * self.model.kv_bytes_per_token,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.model.max_position_embeddings,
        )

    @property
    def scheduler_args(self) -> list[str]:
        return [
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--max-num-batched-tokens",
            str(self.max_num_batched_tokens),
        ]


def _say(message: str) -> None:
    print(f"[bench compare] {message}", file=sys.stderr, flush=True)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise ValueError(f"{flag} takes comma-separated integers, got {text!r}") from error
    if not values or min(values) < 1:
        raise ValueError(f"{flag} needs positive integers, got {text!r}")
    return values


def _peers(text: str) -> tuple[str, ...]:
    peers = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [peer for peer in peers if peer not in KNOWN_PEERS]
    if unknown:
        raise ValueError(f"--peers takes {', '.join(KNOWN_PEERS)}, got {', '.join(unknown)}")
    return peers


def config_from_args(args: argparse.Namespace) -> CompareConfig:
    model = TINY_MODEL if args.model_preset == "tiny" else BenchModelConfig()
    if args.num_requests < 1 or args.repeat < 1:
        raise ValueError(
            f"--num-requests and --repeat must be at least 1, got {args.num_requests}, {args.repeat}"
        )
    config = CompareConfig(
        model=model,
        num_requests=args.num_requests,
        seed=args.seed,
        thread_counts=_int_list(args.threads, "--threads"),
        overhead_sizes=_int_list(args.overhead_sizes, "--overhead-sizes"),
        repeat=args.repeat,
        peers=_peers(args.peers),
    )
    if PEER_VLLM in config.peers and config.model.head_dim not in VLLM_HEAD_SIZES:
        raise ValueError(
            f"vLLM's CPU attention takes head sizes {', '.join(map(str, VLLM_HEAD_SIZES))}; the "
            f"{args.model_preset} model's is {config.model.head_dim}: compare with vLLM on the standard model"
        )
    return config


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run's measurements (outputs aside)."""
    return (
        f"pagewire bench compare --threads {args.threads} --num-requests {args.num_requests} "
        f"--model-preset {args.model_preset} --overhead-sizes {args.overhead_sizes} --seed {args.seed} "
        f"--repeat {args.repeat}" + (f" --peers {args.peers}" if args.peers else "")
    )


def _run_pagewire_workload(
    address: str, requests: list[BenchRequest], workload: str, num_threads: int
) -> tuple[SystemRun, BenchmarkMetrics]:
    """All requests at once over real gRPC, greedy, exactly max_tokens each, after one warm-up request."""

    async def run() -> LoadResult:
        options = LoadOptions(temperature=0.0, ignore_eos=True)
        await wait_until_ready(address, 60.0)
        await warm_up(address, requests[0], options)
        return await run_load(address, requests, (0.0,) * len(requests), options)

    result = asyncio.run(run())
    failed = [r for r in result.records if not r.is_success]
    if failed:
        raise RuntimeError(
            f"pagewire: {len(failed)} requests of workload {workload} failed: {failed[0].error}"
        )
    run = SystemRun(
        system=PAGEWIRE,
        workload=workload,
        num_threads=num_threads,
        duration_s=result.duration_s,
        num_prompt_tokens=sum(r.num_prompt_tokens for r in result.records),
        num_output_tokens=sum(r.num_output_tokens for r in result.records),
        outputs=tuple(r.output_token_ids for r in result.records),
    )
    return run, compute_metrics(result.records, result.duration_s)


def _best(runs: Sequence[SystemRun], system: str, workload: str) -> SystemRun:
    return max(
        (r for r in runs if r.system == system and r.workload == workload),
        key=lambda r: r.output_tokens_per_s,
    )


def _report_run(run: SystemRun) -> None:
    _say(
        f"{run.system} {run.workload} threads={run.num_threads}: {run.output_tokens_per_s:.1f} output tok/s "
        f"({run.duration_s:.1f} s, load {load_average()})"
    )


def _pagewire_a(
    config: CompareConfig,
    model_dir: Path,
    workloads: Workloads,
    num_threads: int,
    log_dir: Path,
    m: CompareMeasurements,
) -> None:
    """Workload A on a fresh executor (`num_threads` torch threads) and scheduler."""
    with running_executor(model_dir, num_threads, config.executor_args, log_dir) as executor:
        with running_scheduler(executor, config.scheduler_args, log_dir) as address:
            _record_pagewire(
                m, *_run_pagewire_workload(address, workloads[WORKLOAD_A], WORKLOAD_A, num_threads)
            )


def _record_pagewire(m: CompareMeasurements, run: SystemRun, metrics: BenchmarkMetrics) -> None:
    m.runs.append(run)
    m.serve_metrics[f"runs[{len(m.runs) - 1}]"] = metrics_to_dict(metrics)
    _report_run(run)


def _hf_a(
    config: CompareConfig, model, requests: list[BenchRequest], num_threads: int, m: CompareMeasurements
) -> None:
    """Static generate (abandoned past SLOWDOWN_LIMIT x its first run) and generate_batch on workload A."""
    first = next((r for r in m.runs if r.system == HF_GENERATE and r.workload == WORKLOAD_A), None)
    limit = None if first is None else SLOWDOWN_LIMIT * first.duration_s
    try:
        run = run_static_generate(model, requests, WORKLOAD_A, config.static_batch_size, num_threads, limit)
    except RunTooSlow as error:
        m.abandoned.append(str(error))
        _say(f"abandoned: {error}")
    else:
        m.runs.append(run)
        _report_run(run)
    m.runs.append(run_generate_batch(model, requests, WORKLOAD_A, config.hf_batching, num_threads))
    _report_run(m.runs[-1])


def _probes(config: CompareConfig, executor: str, workloads: Workloads, m: CompareMeasurements) -> None:
    """KV waste over workload A and per-step overhead from pagewire's engine run in-process; no scheduler
    process may be connected, since the engine takes over the executor's step stream."""
    samples = run_engine_probe(
        executor, workloads[WORKLOAD_A], config.max_num_seqs, config.max_num_batched_tokens
    )
    m.kv_waste = kv_waste(samples, config.block_size)
    _say(f"KV waste over workload A: {100 * m.kv_waste.waste_fraction:.2f}%")
    for num_running in config.overhead_sizes:
        requests = overhead_requests(num_running, config.model.vocab_size, config.seed)
        samples = run_engine_probe(executor, requests, config.max_num_seqs, config.max_num_batched_tokens)
        point = summarize_overhead(samples, num_running, config.block_size)
        m.overhead.append(point)
        _say(
            f"overhead at {num_running} running: {point.outside_forward_ms:.2f} ms outside the forward "
            f"of {point.wall_ms:.2f} ms, plan {point.plan_bytes} B"
        )


def _measure_peak(num_threads: int, m: CompareMeasurements) -> None:
    """Measured again before each thread count's runs; the best measurement is the peak, since other
    processes can only make a measurement slower."""
    peak = measure_matmul_flops(num_threads)
    m.peak_flops[num_threads] = max(peak, m.peak_flops.get(num_threads, 0.0))
    _say(f"fp32 matmul with {num_threads} threads: {peak / 1e9:.1f} GFLOP/s")


def _vllm_run(
    vllm: VllmPeers, requests: list[BenchRequest], workload: str, num_threads: int, m: CompareMeasurements
) -> None:
    if num_threads not in vllm.peers:
        _say(f"starting vLLM bound to {num_threads} cores (a minute or more; not counted)")
    m.runs.append(vllm.run(requests, workload, num_threads))
    _report_run(m.runs[-1])


def _measure(
    config: CompareConfig,
    model_dir: Path,
    workloads: Workloads,
    log_dir: Path,
    m: CompareMeasurements,
    vllm: VllmPeers | None,
) -> None:
    """Every system on A at every thread count, then pagewire, static generate (and vLLM) on B at their
    best thread counts on A; the systems take turns, so that a noisy moment on a shared machine hits them
    alike. Last, the in-process probes on pagewire's executor."""
    hf_model = load_hf_model(model_dir)
    for _ in range(config.repeat):
        for num_threads in config.thread_counts:
            _measure_peak(num_threads, m)
            _pagewire_a(config, model_dir, workloads, num_threads, log_dir, m)
            _hf_a(config, hf_model, workloads[WORKLOAD_A], num_threads, m)
            if vllm is not None:
                _vllm_run(vllm, workloads[WORKLOAD_A], WORKLOAD_A, num_threads, m)
    pagewire_threads = _best(m.runs, PAGEWIRE, WORKLOAD_A).num_threads
    hf_threads = _best(m.runs, HF_GENERATE, WORKLOAD_A).num_threads
    vllm_threads = None if vllm is None else _best(m.runs, VLLM_CPU, WORKLOAD_A).num_threads
    if vllm is not None:
        vllm.close(keep=vllm_threads)
    requests_b = workloads[WORKLOAD_B]
    with running_executor(model_dir, pagewire_threads, config.executor_args, log_dir) as executor:
        for _ in range(config.repeat):
            with running_scheduler(executor, config.scheduler_args, log_dir) as address:
                _record_pagewire(
                    m, *_run_pagewire_workload(address, requests_b, WORKLOAD_B, pagewire_threads)
                )
            m.runs.append(
                run_static_generate(hf_model, requests_b, WORKLOAD_B, config.static_batch_size, hf_threads)
            )
            _report_run(m.runs[-1])
            if vllm is not None and vllm_threads is not None:
                _vllm_run(vllm, requests_b, WORKLOAD_B, vllm_threads, m)
        _probes(config, executor, workloads, m)
    m.overhead_threads = pagewire_threads


def run_compare(args: argparse.Namespace) -> int:
    """Runs every phase, writes compare.json and compare.md under --output-dir, prints the table."""
    config = config_from_args(args)
    # Checked before anything runs: a missing vLLM environment is an error with the fix, not a late crash.
    environment = vllm_environment(Path(args.vllm_python)) if PEER_VLLM in config.peers else None
    output_dir = Path(args.output_dir)
    started = time.monotonic()
    m = CompareMeasurements(machine=describe_machine())
    workloads = config.workloads()
    with tempfile.TemporaryDirectory(prefix="pagewire-bench-") as scratch:
        model_dir = create_bench_model(Path(scratch) / "model", config.model, config.model_seed)
        log_dir = Path(scratch) / "logs"
        settings = config.vllm_settings(model_dir)
        vllm = None if environment is None else VllmPeers(environment, settings, log_dir)
        try:
            _measure(config, model_dir, workloads, log_dir, m, vllm)
        finally:
            if vllm is not None:
                vllm.close()
        m.vllm = None if vllm is None else vllm.describe()
    m.machine["load_average_at_end"] = load_average()
    m.wall_s = time.monotonic() - started
    results = build_results(config, workloads, m, _command(args))
    write_json(output_dir / "compare.json", results)
    report = markdown_report(results)
    (output_dir / "compare.md").write_text(report + "\n", encoding="utf-8")
    if args.readme:
        update_readme(Path(args.readme), report)
    print(report)
    _say(f"done in {m.wall_s:.0f} s; results in {output_dir}")
    return 0
