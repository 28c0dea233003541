"""How many executors one scheduler keeps busy: simulated H100 executors (`pagewire executor --simulate`),
one scheduler driving N of them at saturating load, for N = 1, 2, 4, 8, 16, ...

`python -m benchmarks.scale_out [--executors 1,2,4,8,16] [--seqs-per-executor 256] [--seconds 20]`

For each N: N simulated executor processes and one scheduler process; a closed-loop client keeps
`seqs_per_executor x N` greedy requests in flight (random prompts, fixed output length, EOS ignored).
Over a measurement window after a warm-up it reports sustained output tokens/s (tokens the client
received), the executors' busy fraction (the scheduler's `pagewire:executor_busy_seconds` over N x the
window: a simulated step is busy exactly for its modelled time), and the scheduler's CPU seconds per
engine step (its process CPU time over the steps it recorded). The client runs in this process and
competes with the scheduler for the machine's cores: the figures are for one machine, stated with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from benchmarks.machine import describe_machine
from benchmarks.processes import GENERATION_SERVICE, _running, free_port
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc

VOCAB_IDS = 256  # byte tokens of the simulated executors' tiny tokenizer
BUSY_METRIC = "pagewire:executor_busy_seconds_total"
STEPS_METRIC = "pagewire:step_duration_seconds_count"


@dataclass(frozen=True, slots=True)
class ScalePoint:
    num_executors: int
    num_in_flight: int
    output_tokens_per_second: float
    executor_busy_fraction: float
    scheduler_cpu_ms_per_step: float
    steps_per_second: float
    errors: dict[str, int]


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _metrics(http_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as response:
        return response.read().decode()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _all_executors_ready(address: str, num_executors: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        while time.monotonic() < deadline:
            info = await stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
            if sum(e.ready for e in info.executors) == num_executors:
                return
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{num_executors} executors were not all ready within {timeout_s} s")


async def _load(address: str, num_in_flight: int, prompt_len: int, output_len: int, warmup_s: float,
                window_s: float, on_window: WindowProbe, errors: dict[str, int]) -> int:
    """Keeps `num_in_flight` requests running; returns the output tokens received inside the window and
    counts failed requests by status code in `errors`."""
    rng = random.Random(0)
    started = time.monotonic()
    window_start, window_end = started + warmup_s, started + warmup_s + window_s
    counted = 0

    async def worker(stub: pb_grpc.GenerationStub) -> None:
        nonlocal counted
        while time.monotonic() < window_end:
            request = pb.GenerateRequest(
                token_ids=pb.TokenIds(ids=[rng.randrange(VOCAB_IDS) for _ in range(prompt_len)]),
                sampling=pb.SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True),
            )
            call = stub.Generate(request, timeout=600)
            try:
                async for response in call:
                    now = time.monotonic()
                    if window_start <= now < window_end:
                        counted += len(response.token_ids)
                    if now >= window_end:
                        call.cancel()  # the run is over; the scheduler aborts the request
                        break
            except grpc.aio.AioRpcError as error:
                if time.monotonic() < window_end:
                    errors[error.code().name] = errors.get(error.code().name, 0) + 1

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        probe = asyncio.ensure_future(on_window.run(window_start, window_end))
        await asyncio.gather(*(worker(stub) for _ in range(num_in_flight)))
        await probe
    return counted


class WindowProbe:
    """Reads the scheduler's metrics and CPU time at the window's start and end."""

    def __init__(self, http_port: int, scheduler_pid: int) -> None:
        self.http_port = http_port
        self.pid = scheduler_pid
        self.readings: list[tuple[float, float, float]] = []

    async def run(self, start: float, end: float) -> None:
        for at in (start, end):
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            text = await asyncio.to_thread(_metrics, self.http_port)
            self.readings.append(
                (_metric_sum(text, BUSY_METRIC), _metric_sum(text, STEPS_METRIC), _cpu_seconds(self.pid))
            )


def measure(num_executors: int, args: argparse.Namespace, log_dir: Path) -> ScalePoint:
    num_in_flight = args.seqs_per_executor * num_executors
    with ExitStack() as stack:
        addresses = []
        for index in range(num_executors):
            port = free_port()
            address = f"127.0.0.1:{port}"
            stack.enter_context(_running(
                ["executor", "--simulate", args.profile, "--port", str(port),
                 "--max-num-seqs", str(args.seqs_per_executor), "--max-num-batched-tokens", "8192"],
                address, "", log_dir / f"executor-{num_executors}-{index}.log", 60.0))
            addresses.append(address)
        port, http_port = free_port(), free_port()
        address = f"127.0.0.1:{port}"
        scheduler_args = ["scheduler", "--port", str(port), "--http-port", str(http_port),
                          "--max-num-seqs", str(args.seqs_per_executor), "--max-num-batched-tokens", "8192",
                          "--max-queued-requests", str(num_in_flight * 2), "--max-model-len", "4096"]
        for executor_address in addresses:
            scheduler_args += ["--executor", executor_address]
        scheduler_log = log_dir / f"scheduler-{num_executors}.log"
        stack.enter_context(_running(scheduler_args, address, GENERATION_SERVICE, scheduler_log, 60.0))
        asyncio.run(_all_executors_ready(address, num_executors, 60.0))
        scheduler_pid = _scheduler_pid(port)
        probe = WindowProbe(http_port, scheduler_pid)
        errors: dict[str, int] = {}
        tokens = asyncio.run(_load(address, num_in_flight, args.prompt_len, args.output_len, args.warmup,
                                   args.seconds, probe, errors))
    (busy0, steps0, cpu0), (busy1, steps1, cpu1) = probe.readings
    num_steps = max(steps1 - steps0, 1.0)
    return ScalePoint(
        num_executors=num_executors,
        num_in_flight=num_in_flight,
        output_tokens_per_second=tokens / args.seconds,
        executor_busy_fraction=(busy1 - busy0) / (num_executors * args.seconds),
        scheduler_cpu_ms_per_step=1e3 * (cpu1 - cpu0) / num_steps,
        steps_per_second=num_steps / args.seconds,
        errors=errors,
    )


def _scheduler_pid(port: int) -> int:
    """The pid of the `pagewire scheduler --port PORT` child (started by `_running`)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"scheduler" in argv and b"--port" in argv and argv[argv.index(b"--port") + 1] == str(port).encode():
            return int(entry.name)
    raise RuntimeError(f"no scheduler process on port {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executors", default="1,2,4,8,16", help="executor counts to measure")
    parser.add_argument("--profile", default="h100_llama3_8b", help="the simulated executors' profile")
    parser.add_argument("--seqs-per-executor", type=int, default=256, help="requests in flight per executor")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--warmup", type=float, default=8.0, help="seconds before the window")
    parser.add_argument("--seconds", type=float, default=15.0, help="the measurement window")
    parser.add_argument("--json", default=None, help="write the points here")
    parser.add_argument("--log-dir", default="benchmarks/results/scale_out_logs")
    args = parser.parse_args()
    machine = describe_machine()  # before the run: its load average is the other work's
    points = []
    print("| executors | in flight | output tokens/s | executor busy | scheduler CPU ms/step | steps/s | errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for num_executors in (int(n) for n in args.executors.split(",")):
        point = measure(num_executors, args, Path(args.log_dir))
        points.append(point)
        print(f"| {point.num_executors} | {point.num_in_flight} | {point.output_tokens_per_second:,.0f} | "
              f"{100 * point.executor_busy_fraction:.1f}% | {point.scheduler_cpu_ms_per_step:.2f} | "
              f"{point.steps_per_second:.1f} | {point.errors or 'none'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "args": vars(args),
                                               "points": [asdict(p) for p in points]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
