"""The CPU ops backend's compiled attention against the torch reference ops, and its row invariance."""

from __future__ import annotations

import pytest
import torch

from executor_service.ops.torch_ops import MAX_BATCHED_QUERY_LEN, TorchOps
from tests.helpers.block_tables import scattered_block_tables

CASES = {
    "decode_only": ([1, 1, 1, 1], [1, 7, 16, 33]),
    "prefill_only": ([5, 17, 32], [5, 17, 32]),
    "mixed_prefill_and_decode": ([1, 20, 1, 3, 1], [9, 20, 30, 3, 1]),
    "chunked_prefill_with_cached_prefix": ([18, 7, 1], [40, 23, 12]),
    "verify_drafts_mixed_query_lens": ([4, 2, 1, MAX_BATCHED_QUERY_LEN + 1], [10, 13, 21, 30]),
}


def make_batch(
    make_attention_metadata, query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size
):
    """(query, key_cache, value_cache, metadata); unused cache slots hold NaN, which must never be read."""
    generator = torch.Generator().manual_seed(sum(context_lens) + 7 * head_dim + block_size)
    tables, num_blocks = scattered_block_tables(context_lens, block_size, generator)
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    value_cache = torch.full_like(key_cache, float("nan"))
    for context_len, table in zip(context_lens, tables, strict=True):
        for position in range(context_len):
            block, offset = table[position // block_size], position % block_size
            key_cache[block, offset] = torch.randn(num_kv_heads, head_dim, generator=generator)
            value_cache[block, offset] = torch.randn(num_kv_heads, head_dim, generator=generator)
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator)
    metadata = make_attention_metadata(query_lens, context_lens, tables, block_size)
    return query, key_cache, value_cache, metadata


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim"), [(8, 4, 64), (4, 4, 16), (8, 2, 12), (3, 1, 128)]
)
@pytest.mark.parametrize("block_size", [4, 16])
def test_matches_torch_reference(
    cpu_ops, make_attention_metadata, case, num_heads, num_kv_heads, head_dim, block_size
):
    query_lens, context_lens = CASES[case]
    batch = make_batch(
        make_attention_metadata, query_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size
    )
    scale = head_dim**-0.5
    got = cpu_ops.paged_attention(*batch, scale)
    want = TorchOps().paged_attention(*batch, scale)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 12])
def test_a_row_is_bitwise_the_same_as_decode_or_inside_a_prefill(cpu_ops, make_attention_metadata, head_dim):
    """Prefilling 40 tokens at once gives each row exactly what computing it as a decode gives."""
    query, key_cache, value_cache, prefill = make_batch(
        make_attention_metadata, [40, 3], [40, 70], 8, 2, head_dim, 16
    )
    scale = head_dim**-0.5
    whole = cpu_ops.paged_attention(query, key_cache, value_cache, prefill, scale)
    tables = prefill.block_tables.tolist()
    for position in (0, 13, 39):
        alone = make_attention_metadata([1], [position + 1], [tables[0]], 16)
        row = cpu_ops.paged_attention(query[position : position + 1], key_cache, value_cache, alone, scale)
        assert torch.equal(row[0], whole[position])


def test_other_dtypes_fall_back_to_the_torch_path(cpu_ops, make_attention_metadata):
    query, key_cache, value_cache, metadata = make_batch(make_attention_metadata, [1, 5], [9, 5], 4, 2, 16, 4)
    args = (query.bfloat16(), key_cache.bfloat16(), value_cache.bfloat16(), metadata, 0.25)
    assert torch.equal(cpu_ops.paged_attention(*args), TorchOps().paged_attention(*args))
