"""The CUDA paged attention kernel against the torch reference on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from executor_service.ops.cuda_launch_plan import plan_attention_launch
from executor_service.ops.torch_ops import TorchOps
from tests.helpers.block_tables import scattered_block_tables
from tests.kernels.kernel_checks import RELATIVE_BOUNDS, KernelTarget, relative_error

# (query_lens, context_lens): odd lengths, 1-token and 2k-token contexts, chunked prefill over a
# cached prefix, full prefills and decodes in one launch.
SCENARIOS = {
    "decodes_with_1_and_2k_contexts": ([1, 1, 1, 1, 1], [1, 17, 2048, 33, 100]),
    "prefill_chunks_mixed_with_decodes": ([1, 37, 1, 130, 5], [1, 37, 2048, 200, 5]),
    "single_token_context": ([1], [1]),
    "one_long_prefill_chunk": ([300], [2047]),
}
GQA = {"ratio1": (4, 4), "ratio4": (8, 2), "ratio8": (16, 2)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def run_attention(
    target: KernelTarget,
    make_attention_metadata,
    query_lens,
    context_lens,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype,
    seed,
):
    """(CUDA output, fp32 torch reference, launch plan) for one batch whose unused cache slots hold NaN."""
    device = target.device
    generator = torch.Generator().manual_seed(seed)
    tables, num_blocks = scattered_block_tables(context_lens, block_size, generator, num_spare_blocks=7)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    for table, context_len in zip(tables, context_lens, strict=True):
        for position in range(0, context_len, block_size):
            count = min(block_size, context_len - position)
            block = table[position // block_size]
            key_cache[block, :count] = torch.randn(count, num_kv_heads, head_dim, generator=generator).to(
                dtype
            )
            value_cache[block, :count] = torch.randn(count, num_kv_heads, head_dim, generator=generator).to(
                dtype
            )
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator).to(dtype)
    metadata = make_attention_metadata(query_lens, context_lens, tables, block_size, device=device)
    key_cache, value_cache, query = key_cache.to(device), value_cache.to(device), query.to(device)
    scale = head_dim**-0.5
    expected = TorchOps().paged_attention(
        query.float(), key_cache.float(), value_cache.float(), metadata, scale
    )
    plan = plan_attention_launch(
        tuple(query_lens),
        tuple(context_lens),
        num_heads // num_kv_heads,
        num_kv_heads,
        target.num_sms,
        16,
    )
    num_tokens = sum(query_lens)
    sizes = [num_tokens * num_heads * head_dim * query.element_size()]
    if plan.is_split:
        sizes += [plan.num_splits * num_tokens * num_heads * head_dim * 4] + 2 * [
            plan.num_splits * num_tokens * num_heads * 4
        ]
    target.poison_allocator(sizes)
    launches = target.num_kernel_launches()
    output = target.ops.paged_attention(query, key_cache, value_cache, metadata, scale)
    target.synchronize()
    target.assert_launched(launches, expected=head_dim in (16, 64, 128))
    return output, expected, plan


def emulated_in_make_test(scenario: str, head_dim: int, block_size: int, **_: object) -> bool:
    """The emulated share of `make test`: the whole matrix, except that the 300-row prefill over a 2k
    context (about 5 s emulated, 430 s for all 81 cases) runs at head dim 16 and blocks of 16 only."""
    return scenario != "one_long_prefill_chunk" or (head_dim, block_size) == (16, 16)


EMULATED_IN_MAKE_TEST = {"test_paged_attention_matches_the_torch_reference": emulated_in_make_test}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("gqa", sorted(GQA))
@pytest.mark.parametrize("head_dim", [16, 64, 128])
@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_paged_attention_matches_the_torch_reference(
    kernel_target, make_attention_metadata, scenario, gqa, head_dim, block_size, dtype_name
):
    query_lens, context_lens = SCENARIOS[scenario]
    num_heads, num_kv_heads = GQA[gqa]
    dtype = DTYPES[dtype_name]
    output, expected, _ = run_attention(
        kernel_target,
        make_attention_metadata,
        query_lens,
        context_lens,
        num_heads,
        num_kv_heads,
        head_dim,
        block_size,
        dtype,
        seed=head_dim * 7 + block_size,
    )
    assert output.shape == expected.shape and output.dtype == dtype
    assert torch.isfinite(output).all(), "unwritten (poisoned) or non-finite output elements"
    assert relative_error(output, expected) <= RELATIVE_BOUNDS[dtype]


@pytest.mark.parametrize("num_seqs", [1, 300])
def test_split_and_unsplit_launches_both_match(kernel_target, make_attention_metadata, num_seqs):
    """1 sequence of 4k context takes the split (flash-decoding) path, 300 decodes fill the GPU unsplit."""
    generator = torch.Generator().manual_seed(num_seqs)
    context_lens = (
        [4096] if num_seqs == 1 else torch.randint(1, 600, (num_seqs,), generator=generator).tolist()
    )
    output, expected, plan = run_attention(
        kernel_target,
        make_attention_metadata,
        [1] * num_seqs,
        context_lens,
        32,
        8,
        128,
        16,
        torch.bfloat16,
        seed=3,
    )
    assert plan.is_split == (num_seqs == 1)
    assert torch.isfinite(output).all()
    assert relative_error(output, expected) <= RELATIVE_BOUNDS[torch.bfloat16]


def test_unsupported_head_dim_falls_back_to_the_torch_backend(kernel_target, make_attention_metadata):
    output, expected, _ = run_attention(
        kernel_target, make_attention_metadata, [1, 3], [9, 3], 4, 2, 96, 16, torch.float32, seed=5
    )
    assert relative_error(output, expected) <= RELATIVE_BOUNDS[torch.float32]
