"""Fits a simulated executor's step-time model to the real CPU executor on the tiny model, and writes the
profile: `python -m benchmarks.fit_step_time [--output executor_service/simulation/profiles/cpu_tiny.json]`.

Runs plans straight through the executor's runner (no gRPC), records the forward time the runner
reports for each, and least-squares-fits `base + per_scheduled_token * scheduled + per_context_token *
context`. Every measurement goes into the profile, so the fit can be checked and redone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from executor_service.executor import Executor
from executor_service.executor_config import ExecutorConfig
from executor_service.simulation.step_time_profile import PROFILES_DIR
from executor_service.tiny_model import create_tiny_model
from shared.step_plan import ContinuedSequence, NewSequence, SequenceId, StepPlan

BLOCK_SIZE = 16
# (sequences, context tokens each) of the decode steps measured, and prompt lengths of the prefills.
DECODE_SHAPES = ((1, 32), (1, 512), (8, 32), (8, 512), (32, 128), (64, 32), (64, 256), (128, 64))
PREFILL_LENGTHS = (16, 64, 256, 1024)
REPEATS = 5


class StepTimer:
    """Runs plans on one loaded executor and keeps (scheduled tokens, context tokens, forward seconds)."""

    def __init__(self, executor: Executor) -> None:
        self.runner = executor.runner
        self.step_id = 0
        self.next_block = 0

    def _plan(self, **kwargs: object) -> StepPlan:
        self.step_id += 1
        return StepPlan(step_id=self.step_id, **kwargs)

    def _run(self, plan: StepPlan) -> float:
        result = self.runner.execute(plan)
        assert result.error is None, result.error
        return result.timing.forward_seconds

    def prefill(self, num_tokens: int) -> dict[str, float]:
        """The best of REPEATS one-sequence prefills of `num_tokens`."""
        times = []
        for _ in range(REPEATS):
            num_blocks = -(-num_tokens // BLOCK_SIZE)
            token_ids = tuple(t % 250 for t in range(1, num_tokens + 1))
            plan = self._plan(new_sequences=(
                NewSequence(SequenceId(1), token_ids, num_tokens, 0, tuple(range(num_blocks)), num_tokens),))
            times.append(self._run(plan))
            self.runner.reset()
        return {"kind": "prefill", "sequences": 1, "scheduled_tokens": num_tokens,
                "context_tokens": num_tokens, "forward_seconds": min(times), "median_seconds": statistics.median(times)}

    def decode(self, num_sequences: int, context: int) -> dict[str, float]:
        """Prefills `num_sequences` of `context - 1` tokens, then times REPEATS decode steps (best kept)."""
        blocks_each = -(-(context + REPEATS) // BLOCK_SIZE)
        news = tuple(
            NewSequence(SequenceId(i + 1), tuple((i + t) % 250 for t in range(context - 1)), context - 1, 0,
                tuple(range(i * blocks_each, (i + 1) * blocks_each)), context - 1)
            for i in range(num_sequences)
        )
        self._run(self._plan(new_sequences=news))
        times = []
        for k in range(REPEATS):
            continued = tuple(ContinuedSequence(SequenceId(i + 1), 1) for i in range(num_sequences))
            times.append(self._run(self._plan(continued_sequences=continued)))
            # The context of this step was context + k; the model is fitted at the first step's context.
            if k == 0:
                first_context = num_sequences * context
        self.runner.reset()
        return {"kind": "decode", "sequences": num_sequences, "scheduled_tokens": num_sequences,
                "context_tokens": first_context + num_sequences * (REPEATS - 1) // 2,
                "forward_seconds": min(times), "median_seconds": statistics.median(times)}


def fit(measurements: list[dict[str, float]]) -> tuple[float, float, float]:
    """Least squares of forward_seconds on (1, scheduled, context)."""
    design = torch.tensor([[1.0, m["scheduled_tokens"], m["context_tokens"]] for m in measurements],
        dtype=torch.float64)
    target = torch.tensor([[m["forward_seconds"]] for m in measurements], dtype=torch.float64)
    solution = torch.linalg.lstsq(design, target).solution.flatten().tolist()
    return float(solution[0]), float(solution[1]), float(solution[2])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _commit() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
        check=False)
    return done.stdout.strip() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(PROFILES_DIR / "cpu_tiny.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, as the executor's flag")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = create_tiny_model(Path(scratch) / "tiny")
        config = ExecutorConfig(model_dir=str(model_dir), device="cpu", num_threads=args.threads,
            block_size=BLOCK_SIZE, max_num_batched_tokens=16384, max_num_seqs=256)
        executor = Executor.load(config)
        timer = StepTimer(executor)
        timer.prefill(64)  # warm-up
        measurements = [timer.prefill(n) for n in PREFILL_LENGTHS]
        measurements += [timer.decode(b, c) for b, c in DECODE_SHAPES]
        info = executor.info
    base, per_scheduled, per_context = fit(measurements)
    for m in measurements:
        m["model_seconds"] = base + per_scheduled * m["scheduled_tokens"] + per_context * m["context_tokens"]
    kv_bytes_per_token = info.bytes_per_block // BLOCK_SIZE
    profile = {
        "description": "The CPU executor (torch backend, float32) on the tiny random model of "
        "`pagewire create-tiny-model`, fitted by benchmarks/fit_step_time.py on this machine.",
        "step_time": {"base_seconds": base, "seconds_per_scheduled_token": per_scheduled,
                      "seconds_per_context_token": per_context},
        "model": {"architecture": info.model_config.architecture, "num_layers": info.model_config.num_layers,
                  "num_attention_heads": info.model_config.num_attention_heads,
                  "num_kv_heads": info.model_config.num_kv_heads, "head_dim": info.model_config.head_dim,
                  "hidden_size": info.model_config.hidden_size, "dtype": info.dtype,
                  "max_model_len": info.max_model_len},
        "cache": {"kv_bytes_per_token": kv_bytes_per_token,
                  "kv_cache_bytes": info.num_device_blocks * info.bytes_per_block},
        "speeds": {"swap_out_bytes_per_second": info.speeds.swap_out_bytes_per_second,
                   "swap_in_bytes_per_second": info.speeds.swap_in_bytes_per_second},
        "device": f"cpu ({_cpu_name()}, {args.threads} torch thread{'s' if args.threads > 1 else ''})",
        "tokenizer": "tiny",
        "sources": [
            f"measured {datetime.date.today().isoformat()} at commit {_commit()} by "
            f"`python -m benchmarks.fit_step_time --threads {args.threads}` on {_cpu_name()} "
            f"({platform.machine()}, torch {torch.__version__}); forward_seconds is the runner's own "
            "timing of each plan (best of 5); swap speeds are the executor's start-up measurement",
        ],
        "measurements": measurements,
    }
    Path(args.output).write_text(json.dumps(profile, indent=2) + "\n")
    print(json.dumps(profile["step_time"]))
    for m in measurements:
        print(f"{m['kind']:8} seqs={m['sequences']:4} scheduled={m['scheduled_tokens']:5} "
              f"context={m['context_tokens']:6}  measured={m['forward_seconds'] * 1e3:8.2f} ms  "
              f"model={m['model_seconds'] * 1e3:8.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
