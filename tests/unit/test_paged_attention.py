"""The torch ops backend against plain attention over contiguous K/V, and its cache/block ops."""

from __future__ import annotations

import pytest
import torch

from executor_service.ops.torch_ops import MAX_BATCHED_QUERY_LEN, TorchOps
from tests.helpers.block_tables import scattered_block_tables

HEAD_DIM = 16


def reference_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """Float64 attention of the last `q` of `ctx` positions; query `[q, H, D]`, K/V `[ctx, kvh, D]`."""
    query_len, num_heads, _ = query.shape
    context_len, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    keys = keys.double().repeat_interleave(group, dim=1)
    values = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", query.double(), keys) * scale
    query_positions = torch.arange(context_len - query_len, context_len)
    hidden = torch.arange(context_len)[None, :] > query_positions[:, None]
    scores = scores.masked_fill(hidden[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values)


def run_case(
    make_attention_metadata,
    query_lens: list[int],
    context_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(paged output, float64 reference) for one batch; unused cache slots hold NaN."""
    generator = torch.Generator().manual_seed(sum(context_lens) * 31 + num_heads * 7 + block_size)
    tables, num_blocks = scattered_block_tables(context_lens, block_size, generator)
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, HEAD_DIM), float("nan"), dtype=dtype)
    value_cache = torch.full_like(key_cache, float("nan"))
    queries, expected = [], []
    scale = HEAD_DIM**-0.5
    for query_len, context_len, table in zip(query_lens, context_lens, tables, strict=True):
        keys = torch.randn(context_len, num_kv_heads, HEAD_DIM, generator=generator).to(dtype)
        values = torch.randn(context_len, num_kv_heads, HEAD_DIM, generator=generator).to(dtype)
        query = torch.randn(query_len, num_heads, HEAD_DIM, generator=generator).to(dtype)
        for position in range(context_len):
            block, offset = table[position // block_size], position % block_size
            key_cache[block, offset] = keys[position]
            value_cache[block, offset] = values[position]
        queries.append(query)
        expected.append(reference_attention(query, keys, values, scale))
    metadata = make_attention_metadata(query_lens, context_lens, tables, block_size)
    output = TorchOps().paged_attention(torch.cat(queries), key_cache, value_cache, metadata, scale)
    assert output.shape == (sum(query_lens), num_heads, HEAD_DIM)
    assert output.dtype == dtype
    return output, torch.cat(expected)


CASES = {
    "decode_only": ([1, 1, 1, 1], [1, 7, 16, 33]),
    "prefill_only": ([5, 17, 32], [5, 17, 32]),
    "mixed_prefill_and_decode": ([1, 20, 1, 3, 1], [9, 20, 30, 3, 1]),
    "chunked_prefill_with_cached_prefix": ([18, 7, 1], [40, 23, 12]),
    "verify_drafts_equal_query_lens": ([4, 4, 4], [10, 12, 21]),
    "verify_drafts_mixed_query_lens": ([4, 2, 1, MAX_BATCHED_QUERY_LEN + 1], [10, 13, 21, 30]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_paged_attention_matches_contiguous_attention(
    make_attention_metadata, case, num_heads, num_kv_heads, block_size
):
    query_lens, context_lens = CASES[case]
    output, expected = run_case(
        make_attention_metadata, query_lens, context_lens, num_heads, num_kv_heads, block_size
    )
    torch.testing.assert_close(output.double(), expected, atol=2e-5, rtol=1e-5)


def test_paged_attention_in_bfloat16_is_close_to_float64(make_attention_metadata):
    output, expected = run_case(
        make_attention_metadata, [1, 19, 3], [25, 19, 8], 8, 2, 4, dtype=torch.bfloat16
    )
    torch.testing.assert_close(output.double(), expected, atol=3e-2, rtol=3e-2)


def test_decode_attention_ignores_tokens_past_the_context(make_attention_metadata):
    """Changing the cache at the sequence's own next slot must not change its output."""
    generator = torch.Generator().manual_seed(3)
    key_cache = torch.randn(4, 4, 2, HEAD_DIM, generator=generator)
    value_cache = torch.randn(4, 4, 2, HEAD_DIM, generator=generator)
    query = torch.randn(1, 2, HEAD_DIM, generator=generator)
    metadata = make_attention_metadata([1], [6], [[2, 0]], 4)
    before = TorchOps().paged_attention(query, key_cache, value_cache, metadata, 0.25)
    key_cache[0, 2:] = 1e4
    value_cache[0, 2:] = float("inf")
    after = TorchOps().paged_attention(query, key_cache, value_cache, metadata, 0.25)
    assert torch.equal(before, after)


def test_write_kv_writes_exactly_the_given_slots(make_attention_metadata):
    generator = torch.Generator().manual_seed(0)
    key_cache = torch.randn(6, 4, 2, HEAD_DIM, generator=generator)
    value_cache = torch.randn(6, 4, 2, HEAD_DIM, generator=generator)
    original_keys, original_values = key_cache.clone(), value_cache.clone()
    slots = [21, 3, 4, 12]
    key = torch.randn(len(slots), 2, HEAD_DIM, generator=generator)
    value = torch.randn(len(slots), 2, HEAD_DIM, generator=generator)
    TorchOps().write_kv(key, value, key_cache, value_cache, torch.tensor(slots))
    expected_keys, expected_values = (
        original_keys.view(24, 2, HEAD_DIM).clone(),
        original_values.view(24, 2, HEAD_DIM).clone(),
    )
    expected_keys[slots] = key
    expected_values[slots] = value
    assert torch.equal(key_cache.view(24, 2, HEAD_DIM), expected_keys)
    assert torch.equal(value_cache.view(24, 2, HEAD_DIM), expected_values)
    assert torch.equal(key_cache[5, 1], key[0]) and torch.equal(value_cache[1, 0], value[2])


def test_write_kv_rejects_a_non_contiguous_cache():
    cache = torch.zeros(4, 2, 2, 8).transpose(0, 1)
    with pytest.raises(ValueError, match="contiguous"):
        TorchOps().write_kv(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), cache, cache, torch.tensor([0]))


def test_copy_blocks_copies_all_sources_before_any_write():
    generator = torch.Generator().manual_seed(1)
    caches = [torch.randn(8, 4, 2, HEAD_DIM, generator=generator) for _ in range(3)]
    originals = [cache.clone() for cache in caches]
    src, dst = [3, 5, 1], [7, 3, 0]
    TorchOps().copy_blocks(caches, src, dst)
    for cache, original in zip(caches, originals, strict=True):
        expected = original.clone()
        expected[7], expected[3], expected[0] = original[3], original[5], original[1]
        assert torch.equal(cache, expected)


def test_copy_blocks_with_no_pairs_changes_nothing():
    cache = torch.randn(2, 4, 1, HEAD_DIM)
    original = cache.clone()
    TorchOps().copy_blocks([cache], [], [])
    assert torch.equal(cache, original)


def test_swap_blocks_moves_blocks_between_pools():
    generator = torch.Generator().manual_seed(2)
    device_caches = [torch.randn(6, 4, 2, HEAD_DIM, generator=generator) for _ in range(2)]
    host_caches = [torch.zeros(3, 4, 2, HEAD_DIM) for _ in range(2)]
    TorchOps().swap_blocks(device_caches, host_caches, [4, 0], [2, 0])
    for device_cache, host_cache in zip(device_caches, host_caches, strict=True):
        assert torch.equal(host_cache[2], device_cache[4])
        assert torch.equal(host_cache[0], device_cache[0])
        assert torch.equal(host_cache[1], torch.zeros(4, 2, HEAD_DIM))
    restored = [torch.zeros(6, 4, 2, HEAD_DIM) for _ in range(2)]
    TorchOps().swap_blocks(host_caches, restored, [2], [5])
    assert all(
        torch.equal(r[5], d[4]) and not r[:5].any() for r, d in zip(restored, device_caches, strict=True)
    )


def test_block_ops_reject_unpaired_ids():
    cache = torch.zeros(2, 4, 1, HEAD_DIM)
    with pytest.raises(ValueError, match="2 sources but 1 destinations"):
        TorchOps().copy_blocks([cache], [0, 1], [1])
    with pytest.raises(ValueError, match="1 sources but 0 destinations"):
        TorchOps().swap_blocks([cache], [cache.clone()], [0], [])
