"""The CUDA attention launch plan on the CPU: work items, context splits, and a float64 model of the kernel.

`model_kernel` re-states paged_attention_kernel's index arithmetic (item rows, kv ranges per split, the
causal rule, tiled online softmax in the log2 domain, the split reduction) in torch, so the plan and
the decomposition are checked against the torch reference without a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from executor_service.ops.cuda_launch_plan import (
    MIN_PARTITION_TOKENS,
    PARTITION_ALIGN_TOKENS,
    AttentionLaunchPlan,
    plan_attention_launch,
    rows_per_item,
)
from executor_service.ops.torch_ops import TorchOps

MAX_ROWS = 16
LOG2E = 1.4426950408889634


def test_decode_rows_get_one_item_each_and_prefill_rows_are_packed_by_group():
    plan = plan_attention_launch(
        (1, 7, 1), (5, 7, 300), group=4, num_kv_heads=2, num_sms=1, max_rows=MAX_ROWS
    )
    assert plan.num_splits == 1
    # Ordered by how far each item reads: 300, rows 4..6 of the prefill (to 7), 5, rows 0..3 (to 4).
    assert plan.work_items == ((2, 0, 1), (1, 4, 3), (0, 0, 1), (1, 0, 4))
    assert rows_per_item(7, 4, MAX_ROWS) == 4
    assert rows_per_item(1, 16, MAX_ROWS) == 1
    with pytest.raises(ValueError, match="exceeds"):
        rows_per_item(3, 32, MAX_ROWS)


def test_every_query_row_is_covered_exactly_once():
    query_lens, context_lens = (1, 33, 17, 1, 2), (1, 40, 17, 2048, 9)
    plan = plan_attention_launch(query_lens, context_lens, 8, 1, 132, MAX_ROWS)
    covered = sorted((seq, row) for seq, first, n in plan.work_items for row in range(first, first + n))
    assert covered == sorted((seq, row) for seq, q in enumerate(query_lens) for row in range(q))
    assert all(n * 8 <= MAX_ROWS for _, _, n in plan.work_items)


def test_a_few_long_decodes_are_split_into_aligned_partitions():
    plan = plan_attention_launch(
        (1, 1), (4096, 1000), group=8, num_kv_heads=8, num_sms=132, max_rows=MAX_ROWS
    )
    assert plan.is_split
    assert plan.partition_tokens % PARTITION_ALIGN_TOKENS == 0
    assert plan.partition_tokens >= MIN_PARTITION_TOKENS
    assert plan.num_splits == math.ceil(4096 / plan.partition_tokens)
    assert (plan.num_splits - 1) * plan.partition_tokens < 4096


def test_no_split_when_the_grid_already_fills_the_gpu_or_contexts_are_short():
    busy = plan_attention_launch((1,) * 256, (4096,) * 256, 4, 8, 132, MAX_ROWS)
    assert not busy.is_split
    short = plan_attention_launch((1,), (300,), 4, 8, 132, MAX_ROWS)
    assert not short.is_split


def test_a_query_longer_than_its_context_is_rejected():
    with pytest.raises(ValueError, match="computes 5 tokens"):
        plan_attention_launch((5,), (4,), 1, 1, 1, MAX_ROWS)


def model_kernel(query, key_cache, value_cache, metadata, scale, plan: AttentionLaunchPlan, tile_keys: int):
    """float64 re-statement of paged_attention_kernel + paged_attention_reduce_kernel."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = metadata.query_start_loc.tolist()
    tables = metadata.block_tables.tolist()
    neg_inf = float("-inf")
    partial = torch.zeros(plan.num_splits, num_tokens, num_heads, head_dim, dtype=torch.float64)
    partial_max = torch.full((plan.num_splits, num_tokens, num_heads), neg_inf, dtype=torch.float64)
    partial_sum = torch.zeros(plan.num_splits, num_tokens, num_heads, dtype=torch.float64)
    for seq, first_row, num_rows_in_item in plan.work_items:
        query_len = starts[seq + 1] - starts[seq]
        first_position = metadata.context_lens_cpu[seq] - query_len + first_row
        rows = torch.arange(num_rows_in_item * group)
        tokens = starts[seq] + first_row + rows // group
        for kv_head in range(num_kv_heads):
            heads = kv_head * group + rows % group
            q = query[tokens, heads].double() * scale * LOG2E
            for split in range(plan.num_splits):
                kv_begin = split * plan.partition_tokens
                kv_end = min(first_position + num_rows_in_item, kv_begin + plan.partition_tokens)
                row_max = torch.full((len(rows),), neg_inf, dtype=torch.float64)
                row_sum = torch.zeros(len(rows), dtype=torch.float64)
                acc = torch.zeros(len(rows), head_dim, dtype=torch.float64)
                for tile_start in range(kv_begin, kv_end, tile_keys):
                    positions = torch.arange(tile_start, tile_start + tile_keys)
                    valid = positions < kv_end
                    slots = [
                        tables[seq][p // block_size] * block_size + p % block_size if v else 0
                        for p, v in zip(positions.tolist(), valid.tolist(), strict=True)
                    ]
                    keys = (
                        key_cache.view(-1, num_kv_heads, head_dim)[slots, kv_head].double() * valid[:, None]
                    )
                    values = (
                        value_cache.view(-1, num_kv_heads, head_dim)[slots, kv_head].double() * valid[:, None]
                    )
                    visible = valid[None, :] & (
                        positions[None, :] <= first_position + (rows // group)[:, None]
                    )
                    scores = torch.where(visible, q @ keys.T, neg_inf)
                    new_max = torch.maximum(row_max, scores.max(dim=1).values)
                    finite = new_max != neg_inf
                    p = torch.where(finite[:, None], torch.exp2(scores - new_max[:, None]), 0.0)
                    rescale = torch.where(row_max != neg_inf, torch.exp2(row_max - new_max), 0.0)
                    row_sum = row_sum * rescale + p.sum(dim=1)
                    acc = acc * rescale[:, None] + p @ values
                    row_max = new_max
                partial[split, tokens, heads] = acc
                partial_max[split, tokens, heads] = row_max
                partial_sum[split, tokens, heads] = row_sum
    global_max = partial_max.max(dim=0).values
    weights = torch.where(partial_max != neg_inf, torch.exp2(partial_max - global_max), 0.0)
    total = (weights * partial_sum).sum(dim=0)
    return (weights[..., None] * partial).sum(dim=0) / total[..., None]


@pytest.mark.parametrize("num_sms", [1, 64], ids=["unsplit", "split"])
@pytest.mark.parametrize("tile_keys", [16, 64])  # the smallest and largest kKeys the kernel picks
def test_model_of_the_kernel_matches_the_torch_reference(make_attention_metadata, num_sms, tile_keys):
    generator = torch.Generator().manual_seed(11)
    block_size, num_heads, num_kv_heads, head_dim = 16, 8, 2, 16
    query_lens, context_lens = [1, 9, 1, 3], [700, 9, 1, 530]
    needed = [-(-n // block_size) for n in context_lens]
    pool = torch.randperm(sum(needed) + 3, generator=generator).tolist()
    tables, taken = [], 0
    for count in needed:
        tables.append(pool[taken : taken + count])
        taken += count
    key_cache = torch.randn(len(pool), block_size, num_kv_heads, head_dim, generator=generator)
    value_cache = torch.randn(len(pool), block_size, num_kv_heads, head_dim, generator=generator)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator)
    metadata = make_attention_metadata(query_lens, context_lens, tables, block_size)
    plan = plan_attention_launch(
        metadata.query_lens_cpu,
        metadata.context_lens_cpu,
        num_heads // num_kv_heads,
        num_kv_heads,
        num_sms,
        MAX_ROWS,
    )
    assert plan.is_split == (num_sms == 64)
    modelled = model_kernel(query, key_cache, value_cache, metadata, 0.25, plan, tile_keys)
    expected = TorchOps().paged_attention(query, key_cache, value_cache, metadata, 0.25)
    torch.testing.assert_close(modelled.float(), expected, rtol=1e-5, atol=1e-5)
