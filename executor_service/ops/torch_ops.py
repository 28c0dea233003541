"""The torch reference ops backend: the test oracle for the CUDA backend, and what CPU users run."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from executor_service.attention_metadata import AttentionMetadata
from executor_service.ops import torch_sgmv
from executor_service.ops.base import OpsBackend, check_block_pairs
from executor_service.ops.sgmv_segments import SgmvSegments

# Sequences computing at most this many tokens (decodes, speculative verification) are batched
# through the padded-gather path; longer prefill chunks run one sequence at a time through SDPA.
MAX_BATCHED_QUERY_LEN = 16


class TorchOps(OpsBackend):
    """Paged attention and block ops written with batched torch tensor ops, on any device.

    Attention over the paged cache runs in two shapes. Sequences with a short query (decode, draft
    verification) are grouped by query length and computed together: their context slots are gathered
    into a padded `[B, max_context, num_kv_heads, head_dim]` tensor and attended in float32 by one
    masked `scaled_dot_product_attention`, with GQA done by folding query heads into
    `[B, num_kv_heads, query_len * group, head_dim]`. Longer prefill chunks are computed one sequence
    at a time in the query's dtype (fused SDPA kernels, no float32 copy of a long context), causally
    over their cached prefix.
    """

    name = "torch"

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        _flat_slots(key_cache).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
        _flat_slots(value_cache).index_copy_(0, slot_mapping, value.to(value_cache.dtype))

    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        query_lens = metadata.query_lens_cpu
        num_seqs = metadata.num_seqs
        if (
            num_seqs > 0
            and all(n == query_lens[0] for n in query_lens)
            and query_lens[0] <= MAX_BATCHED_QUERY_LEN
        ):
            # The common step (all decodes): every row in order, no index bookkeeping.
            return _batched_attention(
                query,
                key_cache,
                value_cache,
                metadata.block_tables,
                metadata.context_lens,
                query_lens[0],
                max(metadata.context_lens_cpu),
                metadata.block_size,
                scale,
            )

        output = torch.empty_like(query)
        starts = _cumulative(query_lens)
        groups: dict[int, list[int]] = defaultdict(list)
        for seq_index, query_len in enumerate(query_lens):
            if 0 < query_len <= MAX_BATCHED_QUERY_LEN:
                groups[query_len].append(seq_index)
            elif query_len > MAX_BATCHED_QUERY_LEN:
                start = starts[seq_index]
                output[start : start + query_len] = _sequence_attention(
                    query[start : start + query_len],
                    key_cache,
                    value_cache,
                    metadata.block_tables[seq_index],
                    metadata.context_lens_cpu[seq_index],
                    metadata.block_size,
                    scale,
                )
        for query_len, seq_indices in groups.items():
            seq_index_tensor = torch.tensor(seq_indices, dtype=torch.long, device=query.device)
            row_offsets = torch.arange(query_len, device=query.device)
            first_rows = torch.tensor([starts[i] for i in seq_indices], dtype=torch.long, device=query.device)
            rows = (first_rows[:, None] + row_offsets[None, :]).flatten()
            output.index_copy_(
                0,
                rows,
                _batched_attention(
                    query.index_select(0, rows),
                    key_cache,
                    value_cache,
                    metadata.block_tables.index_select(0, seq_index_tensor),
                    metadata.context_lens.index_select(0, seq_index_tensor),
                    query_len,
                    max(metadata.context_lens_cpu[i] for i in seq_indices),
                    metadata.block_size,
                    scale,
                ),
            )
        return output

    def copy_blocks(
        self, caches: list[torch.Tensor], src_block_ids: list[int], dst_block_ids: list[int]
    ) -> None:
        check_block_pairs("copy_blocks", src_block_ids, dst_block_ids)
        if not src_block_ids:
            return
        by_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for cache in caches:
            if cache.device not in by_device:
                by_device[cache.device] = (
                    _index_tensor(src_block_ids, cache.device),
                    _index_tensor(dst_block_ids, cache.device),
                )
            src, dst = by_device[cache.device]
            # index_select materialises every source before any write, so chains (a->b, b->c) read old data.
            cache.index_copy_(0, dst, cache.index_select(0, src))

    def swap_blocks(
        self,
        src_caches: list[torch.Tensor],
        dst_caches: list[torch.Tensor],
        src_block_ids: list[int],
        dst_block_ids: list[int],
    ) -> None:
        check_block_pairs("swap_blocks", src_block_ids, dst_block_ids, src_caches, dst_caches)
        if not src_block_ids or not src_caches:
            return
        src = _index_tensor(src_block_ids, src_caches[0].device)
        dst = _index_tensor(dst_block_ids, dst_caches[0].device)
        for src_cache, dst_cache in zip(src_caches, dst_caches, strict=True):
            blocks = src_cache.index_select(0, src).to(dst_cache.device)
            dst_cache.index_copy_(0, dst, blocks)
        if dst_caches[0].device.type == "cuda":
            torch.cuda.synchronize(dst_caches[0].device)

    def sgmv_shrink(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        out: torch.Tensor,
        segments: SgmvSegments,
        scale: float,
    ) -> None:
        torch_sgmv.sgmv_shrink(x, lora_a, out, segments, scale)

    def sgmv_expand(
        self,
        v: torch.Tensor,
        lora_b: torch.Tensor,
        out: torch.Tensor,
        segments: SgmvSegments,
    ) -> None:
        torch_sgmv.sgmv_expand(v, lora_b, out, segments)


def _batched_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_len: int,
    max_context_len: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention for B sequences that each compute `query_len` tokens; `query` is `[B * query_len, H, D]`."""
    num_rows, num_heads, head_dim = query.shape
    num_seqs = num_rows // query_len
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    num_blocks = -(-max_context_len // block_size)
    device = query.device

    positions = torch.arange(max_context_len, device=device)
    context_lens = context_lens.to(torch.long)
    in_context = positions[None, :] < context_lens[:, None]  # [B, T]
    block_slots = block_tables[:, :num_blocks].to(torch.long)[:, :, None] * block_size
    slots = (block_slots + torch.arange(block_size, device=device)).view(num_seqs, -1)[:, :max_context_len]
    # Positions past a context read the sequence's first slot instead: a slot past the context may hold
    # anything (the unused tail of a swapped-in block), and a NaN there would survive masking (0 * NaN).
    slots = torch.where(in_context, slots, slots[:, :1]).flatten()
    padded_shape = (num_seqs, max_context_len, num_kv_heads, head_dim)
    keys = _flat_slots(key_cache).index_select(0, slots).view(padded_shape)
    values = _flat_slots(value_cache).index_select(0, slots).view(padded_shape)

    # [B, q, kvh, g, D] -> [B, kvh, q * g, D]: the g query heads of a kv head attend as g extra rows,
    # so K/V are never repeated per query head.
    folded = query.view(num_seqs, query_len, num_kv_heads, group, head_dim).permute(0, 2, 1, 3, 4)
    folded = folded.reshape(num_seqs, num_kv_heads, query_len * group, head_dim)
    if query_len == 1:
        visible = in_context[:, None, None, :]
    else:
        # New token j of sequence b sits at position context_len - query_len + j and sees keys up to it.
        last_visible = (context_lens - query_len)[:, None] + torch.arange(query_len, device=device)
        visible = positions[None, None, :] <= last_visible[:, :, None]  # [B, q, T]
        visible = visible[:, None, :, None, :].expand(num_seqs, 1, query_len, group, max_context_len)
        visible = visible.reshape(num_seqs, 1, query_len * group, max_context_len)
    out = F.scaled_dot_product_attention(
        folded.float(),
        keys.float().transpose(1, 2),
        values.float().transpose(1, 2),
        attn_mask=visible,
        scale=scale,
    )
    out = out.view(num_seqs, num_kv_heads, query_len, group, head_dim).permute(0, 2, 1, 3, 4)
    return out.reshape(num_rows, num_heads, head_dim).to(query.dtype)


def _sequence_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention of one sequence's prefill chunk `[q, H, D]` over its whole context."""
    query_len, _, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    num_blocks = -(-context_len // block_size)
    block_ids = block_table[:num_blocks]
    keys = key_cache.index_select(0, block_ids).view(-1, num_kv_heads, head_dim)[:context_len]
    values = value_cache.index_select(0, block_ids).view(-1, num_kv_heads, head_dim)[:context_len]
    keys = keys.to(query.dtype).transpose(0, 1).unsqueeze(0)
    values = values.to(query.dtype).transpose(0, 1).unsqueeze(0)
    queries = query.transpose(0, 1).unsqueeze(0)
    if context_len == query_len:
        out = F.scaled_dot_product_attention(
            queries, keys, values, is_causal=True, scale=scale, enable_gqa=True
        )
    else:
        prefix_len = context_len - query_len
        query_positions = prefix_len + torch.arange(query_len, device=query.device)
        visible = torch.arange(context_len, device=query.device)[None, :] <= query_positions[:, None]
        out = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=visible, scale=scale, enable_gqa=True
        )
    return out.squeeze(0).transpose(0, 1)


def _flat_slots(cache: torch.Tensor) -> torch.Tensor:
    """`[num_blocks, block_size, kvh, D]` as a `[num_slots, kvh, D]` view sharing storage."""
    if not cache.is_contiguous():
        raise ValueError("KV cache tensors must be contiguous to be written by slot")
    return cache.view(-1, *cache.shape[2:])


def _index_tensor(block_ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(block_ids, dtype=torch.long, device=device)


def _cumulative(lengths: tuple[int, ...]) -> list[int]:
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    return starts
