"""Workload A through the model alone: the forward paths compared in one process, interleaved.

No scheduler, no gRPC: a minimal continuous-batching loop (decodes first, then prefill chunks up to
the 2048-token step budget, like the engine's defaults) drives the bench model over a paged cache,
greedy. Each variant runs the whole workload once per round; rounds alternate the variants so a noisy
moment hits them alike, and the best round counts. Every variant's greedy tokens are compared with the
first variant's. Run: `.venv/bin/python -m benchmarks.forward_bench --rounds 3`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.bench_model import BenchModelConfig, create_bench_model
from benchmarks.workloads import LengthRange, random_requests
from executor_service.attention_metadata import AttentionMetadata
from executor_service.model import llama, load_model
from executor_service.model.invariant_linear import invariant_linear
from executor_service.ops.base import OpsBackend
from executor_service.ops.cpu_ops import CpuOps
from executor_service.ops.torch_ops import TorchOps

BLOCK_SIZE = 16
STEP_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class Variant:
    """A forward path: an ops backend and the linear function the model's layers call."""

    name: str
    ops: Callable[[], OpsBackend]
    linear: Callable[..., torch.Tensor]




def _mkl_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed=None) -> torch.Tensor:
    return F.linear(x, weight, bias)


VARIANTS = {
    "before": Variant("torch ops + F.linear (before)", TorchOps, _mkl_linear),
    "onednn": Variant("torch ops + oneDNN linear", TorchOps, invariant_linear),
    "kernel": Variant("cpu kernel + F.linear", CpuOps, _mkl_linear),
    "after": Variant("cpu kernel + oneDNN linear (after)", CpuOps, invariant_linear),
}


def _metadata(query_lens, context_lens, tables, slots) -> AttentionMetadata:
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    width = max(len(t) for t in tables)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        block_size=BLOCK_SIZE,
        query_lens_cpu=tuple(query_lens),
        context_lens_cpu=tuple(context_lens),
    )


def run_workload(model, config, prompts: list[list[int]], num_output: int) -> tuple[float, list[list[int]]]:
    """(forward seconds, greedy tokens per request) for the whole workload."""
    num_blocks = sum(-(-(len(p) + num_output) // BLOCK_SIZE) for p in prompts)
    shape = (num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(config.num_layers)]
    tables, next_block = [], 0
    for p in prompts:
        count = -(-(len(p) + num_output) // BLOCK_SIZE)
        tables.append(list(range(next_block, next_block + count)))
        next_block += count
    tokens = [list(p) for p in prompts]
    computed = [0] * len(prompts)
    outputs: list[list[int]] = [[] for _ in prompts]
    seconds = 0.0
    while any(len(o) < num_output for o in outputs):
        chunks: list[tuple[int, int]] = []  # (request, tokens this step)
        budget = STEP_TOKENS
        for i, p in enumerate(prompts):
            if computed[i] >= len(p) and len(outputs[i]) < num_output:
                chunks.append((i, 1))
                budget -= 1
        for i, p in enumerate(prompts):
            if computed[i] < len(p) and budget > 0:
                n = min(len(p) - computed[i], budget)
                chunks.append((i, n))
                budget -= n
        ids, positions, slots, query_lens, context_lens, step_tables, samples = [], [], [], [], [], [], []
        for i, n in chunks:
            start = computed[i]
            ids += tokens[i][start : start + n]
            positions += range(start, start + n)
            slots += [
                tables[i][q // BLOCK_SIZE] * BLOCK_SIZE + q % BLOCK_SIZE for q in range(start, start + n)
            ]
            query_lens.append(n)
            context_lens.append(start + n)
            step_tables.append(tables[i])
            samples.append(start + n == len(tokens[i]))
        metadata = _metadata(query_lens, context_lens, step_tables, slots)
        last_rows = torch.tensor(query_lens).cumsum(0) - 1
        sampling = torch.tensor([k for k, s in enumerate(samples) if s], dtype=torch.long)
        started = time.perf_counter()
        with torch.inference_mode():
            hidden = model(torch.tensor(ids), torch.tensor(positions), caches, metadata)
            logits = model.compute_logits(hidden[last_rows[sampling]])
            next_tokens = np.argmax(logits.numpy(), axis=-1).tolist()  # what the sampler does on CPU
        seconds += time.perf_counter() - started
        for i, n in chunks:
            computed[i] += n
        for k, token in zip(sampling.tolist(), next_tokens, strict=True):
            i = chunks[k][0]
            outputs[i].append(token)
            tokens[i].append(token)
    return seconds, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--variants", default="before,after", help=f"comma list of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    bench = BenchModelConfig(num_layers=args.num_layers)
    requests = random_requests(
        args.num_requests, LengthRange(32, 256), LengthRange(64, 64), bench.vocab_size, seed=0
    )
    prompts = [list(r.prompt_token_ids) for r in requests]
    num_output = 64
    directory = create_bench_model(tempfile.mkdtemp(prefix="pagewire-fwd-"), bench, seed=0)
    names = args.variants.split(",")
    models = {}
    for name in names:
        variant = VARIANTS[name]
        llama.invariant_linear = variant.linear
        models[name] = load_model(str(directory), torch.float32, torch.device("cpu"), variant.ops())
    best = {name: float("inf") for name in names}
    tokens: dict[str, list[list[int]]] = {}
    print(f"threads {torch.get_num_threads()}, load {os.getloadavg()}")
    for round_index in range(args.rounds):
        for name in names:
            llama.invariant_linear = VARIANTS[name].linear
            model, config = models[name]
            seconds, outputs = run_workload(model, config, prompts, num_output)
            best[name] = min(best[name], seconds)
            tokens.setdefault(name, outputs)
            same = sum(a == b for a, b in zip(outputs, tokens[names[0]], strict=True))
            print(f"round {round_index} {VARIANTS[name].name}: {seconds:.2f} s forward, "
                  f"{len(prompts) * num_output / seconds:.0f} output tok/s, requests equal to {names[0]}: "
                  f"{same}/{len(prompts)}", flush=True)
    print(f"load after {os.getloadavg()}")
    for name in names:
        speedup = best[names[0]] / best[name]
        print(f"best {VARIANTS[name].name}: {best[name]:.2f} s, speed-up over {names[0]} {speedup:.3f}x")


if __name__ == "__main__":
    main()
