"""Kernel benchmark of the CUDA ops backend; prints one table (CUDA only).

    python -m benchmarks.kernels [--output-dir DIR] [--quick]

Rows: the device copy bandwidth (the roofline), decode attention (batch 1-256, context 128-32k, a
Llama-3-8B layer: 32 query heads, 8 KV heads, head dim 128, bf16, blocks of 16) as achieved bytes/s
against that bandwidth and time against `scaled_dot_product_attention` on the same shapes laid out
contiguously, SGMV shrink+expand with 1/8/32 adapters against a per-adapter loop of matmuls, and
swap out/in against one plain pinned memcpy of the same bytes. Times are medians of CUDA-event timings.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from executor_service.attention_metadata import AttentionMetadata
from executor_service.ops.sgmv_segments import SgmvSegments
from executor_service.ops.torch_ops import TorchOps

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
# K+V bytes of one attention case at most, so the contiguous SDPA copy fits beside the paged cache.
MAX_KV_BYTES = 12 * 1024**3


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table; `percent_of_copy` is achieved bytes/s over the measured copy bandwidth."""

    kernel: str
    case: str
    pagewire_us: float
    baseline: str
    baseline_us: float | None
    achieved_gb_per_s: float | None
    percent_of_copy: float | None
    target: str


def time_us(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median microseconds of `fn` between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read and written."""
    src = torch.empty(1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    microseconds = time_us(lambda: dst.copy_(src), repeats=20)
    return 2 * src.numel() / (microseconds * 1e-6)


def decode_metadata(context_lens: list[int], device: torch.device) -> tuple[AttentionMetadata, int]:
    blocks_per_seq = [-(-n // BLOCK_SIZE) for n in context_lens]
    num_blocks = sum(blocks_per_seq)
    pool = torch.randperm(num_blocks, device=device, dtype=torch.int64).to(torch.int32)
    width = max(blocks_per_seq)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32, device=device)
    taken = 0
    for seq, count in enumerate(blocks_per_seq):
        tables[seq, :count] = pool[taken : taken + count]
        taken += count
    num_seqs = len(context_lens)
    metadata = AttentionMetadata(
        slot_mapping=torch.zeros(num_seqs, dtype=torch.int64, device=device),
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32, device=device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
        block_tables=tables,
        block_size=BLOCK_SIZE,
        query_lens_cpu=(1,) * num_seqs,
        context_lens_cpu=tuple(context_lens),
    )
    return metadata, num_blocks


def paged_attention_us(ops, batch: int, context: int, device: torch.device) -> float:
    metadata, num_blocks = decode_metadata([context] * batch, device)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, dtype=DTYPE, device=device)
    value_cache = torch.randn(shape, dtype=DTYPE, device=device)
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    run = functools.partial(ops.paged_attention, query, key_cache, value_cache, metadata, HEAD_DIM**-0.5)
    return time_us(run, repeats=20)


def sdpa_us(batch: int, context: int, device: torch.device) -> float:
    """The same decode over K/V laid out contiguously `[batch, kv_heads, context, head_dim]`."""
    keys = torch.randn(batch, NUM_KV_HEADS, context, HEAD_DIM, dtype=DTYPE, device=device)
    values = torch.randn_like(keys)
    query = torch.randn(batch, NUM_HEADS, 1, HEAD_DIM, dtype=DTYPE, device=device)
    run = functools.partial(
        F.scaled_dot_product_attention, query, keys, values, scale=HEAD_DIM**-0.5, enable_gqa=True
    )
    return time_us(run, repeats=20)


def attention_rows(ops, device: torch.device, copy_bytes_per_s: float, quick: bool) -> list[Row]:
    rows = []
    batches = (1, 16, 256) if quick else (1, 8, 64, 256)
    contexts = (128, 4096, 32768) if quick else (128, 1024, 4096, 16384, 32768)
    element = torch.empty((), dtype=DTYPE).element_size()
    for batch in batches:
        for context in contexts:
            kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * element
            if kv_bytes > MAX_KV_BYTES:
                continue
            paged = paged_attention_us(ops, batch, context, device)
            sdpa = sdpa_us(batch, context, device)
            achieved = kv_bytes / (paged * 1e-6)
            rows.append(
                Row(
                    "decode attention",
                    f"batch {batch}, context {context}",
                    paged,
                    "SDPA contiguous",
                    sdpa,
                    achieved / 1e9,
                    100 * achieved / copy_bytes_per_s,
                    ">= 80% copy bw (ctx >= 4k); <= 1.10x SDPA",
                )
            )
    return rows


def lora_step(backend, x, lora_a, lora_b, shrunk, out, segments: SgmvSegments) -> None:
    backend.sgmv_shrink(x, lora_a, shrunk, segments, 2.0)
    backend.sgmv_expand(shrunk, lora_b, out, segments)


def sgmv_rows(ops, device: torch.device) -> list[Row]:
    rows = []
    num_tokens, hidden, rank = 256, 4096, 16
    reference = TorchOps()
    single_us = None
    for num_adapters in (1, 8, 32):
        starts = [round(i * num_tokens / num_adapters) for i in range(num_adapters + 1)]
        segments = SgmvSegments.build(starts, list(range(num_adapters)), device)
        tensors = (
            torch.randn(num_tokens, hidden, dtype=DTYPE, device=device),
            torch.randn(num_adapters, rank, hidden, dtype=DTYPE, device=device),
            torch.randn(num_adapters, hidden, rank, dtype=DTYPE, device=device),
            torch.empty(num_tokens, rank, device=device),
            torch.zeros(num_tokens, hidden, dtype=DTYPE, device=device),
        )
        kernel_us = time_us(functools.partial(lora_step, ops, *tensors, segments), repeats=50)
        loop_us = time_us(functools.partial(lora_step, reference, *tensors, segments), repeats=20)
        single_us = single_us or kernel_us
        weight_bytes = 2 * num_adapters * rank * hidden * 2
        rows.append(
            Row(
                "sgmv shrink+expand",
                f"{num_adapters} adapters, 256 tokens, 4096x{rank}",
                kernel_us,
                "per-adapter matmul loop",
                loop_us,
                weight_bytes / (kernel_us * 1e-6) / 1e9,
                None,
                f"32 adapters <= 1.5x of 1 ({kernel_us / single_us:.2f}x here)",
            )
        )
    return rows


def pinned_memcpy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=True)
    torch.cuda.current_stream().synchronize()


def swap_rows(ops, device: torch.device) -> list[Row]:
    num_layers, num_blocks = 32, 256
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    device_caches = [torch.randn(shape, dtype=DTYPE, device=device) for _ in range(2 * num_layers)]
    host_caches = [torch.empty(shape, dtype=DTYPE, pin_memory=True) for _ in range(2 * num_layers)]
    block_ids = list(range(0, num_blocks, 2))
    moved = (
        len(block_ids) * device_caches[0][0].numel() * device_caches[0].element_size() * len(device_caches)
    )
    flat_device = torch.empty(moved, dtype=torch.uint8, device=device)
    flat_host = torch.empty(moved, dtype=torch.uint8, pin_memory=True)
    rows = []
    for direction, src, dst, flat_src, flat_dst in (
        ("out (device->host)", device_caches, host_caches, flat_device, flat_host),
        ("in (host->device)", host_caches, device_caches, flat_host, flat_device),
    ):
        swap_us = time_us(functools.partial(ops.swap_blocks, src, dst, block_ids, block_ids), repeats=10)
        plain_us = time_us(functools.partial(pinned_memcpy, flat_dst, flat_src), repeats=10)
        rows.append(
            Row(
                f"swap {direction}",
                f"{len(block_ids)} blocks x {len(device_caches)} caches, {moved >> 20} MiB",
                swap_us,
                "one pinned memcpy",
                plain_us,
                moved / (swap_us * 1e-6) / 1e9,
                100 * plain_us / swap_us,
                ">= 80% of pinned memcpy (percent column)",
            )
        )
    return rows


def _number(value: float | None, digits: int) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_table(rows: list[Row], device_name: str, copy_gb_per_s: float) -> str:
    lines = [
        f"Device: {device_name}; measured device copy bandwidth {copy_gb_per_s:.0f} GB/s (read + write).",
        "",
        "| kernel | case | pagewire µs | baseline | baseline µs | GB/s | % of roofline | target |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row.kernel} | {row.case} | {row.pagewire_us:.1f} | {row.baseline} "
            f"| {_number(row.baseline_us, 1)} | {_number(row.achieved_gb_per_s, 0)} "
            f"| {_number(row.percent_of_copy, 0)} | {row.target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--output-dir", type=Path, default=None, help="also write kernels.md and kernels.json here"
    )
    parser.add_argument("--quick", action="store_true", help="fewer attention shapes")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.kernels needs a CUDA device; none is visible", file=sys.stderr)
        return 2
    from executor_service.ops.cuda_ops import CudaOps  # noqa: PLC0415 (imports CuPy)

    device = torch.device("cuda", torch.cuda.current_device())
    ops = CudaOps()
    copy_bytes_per_s = copy_bandwidth(device)
    rows = attention_rows(ops, device, copy_bytes_per_s, args.quick)
    rows += sgmv_rows(ops, device)
    rows += swap_rows(ops, device)
    table = format_table(rows, torch.cuda.get_device_name(device), copy_bytes_per_s / 1e9)
    print(table)
    if args.output_dir is not None:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        (args.output_dir / "kernels.md").write_text(table + "\n", encoding="utf-8")
        payload = {
            "device": torch.cuda.get_device_name(device),
            "copy_gb_per_s": copy_bytes_per_s / 1e9,
            "rows": [asdict(row) for row in rows],
        }
        (args.output_dir / "kernels.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
