"""The CUDA K/V write, block copy and block swap against the torch reference, bit for bit."""

from __future__ import annotations

import pytest
import torch

from executor_service.ops.torch_ops import TorchOps

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def nan_cache(
    num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, device
) -> torch.Tensor:
    return torch.full(
        (num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device
    )


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.cpu().view(torch.int16 if tensor.element_size() == 2 else torch.int32)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal including NaN positions: slots nobody wrote must still hold the poison."""
    assert torch.equal(bits(actual), bits(expected))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("num_kv_heads", "head_dim", "block_size"), [(2, 16, 8), (8, 128, 16), (1, 64, 32)])
def test_write_kv_writes_exactly_the_given_slots(kernel_target, dtype, num_kv_heads, head_dim, block_size):
    device = kernel_target.device
    generator = torch.Generator().manual_seed(head_dim)
    num_blocks, num_tokens = 9, 37
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens].to(device)
    # K and V as column slices of one fused projection, as the model produces them.
    fused = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, generator=generator).to(dtype).to(device)
    key = fused[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    value = fused[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    caches = [nan_cache(num_blocks, block_size, num_kv_heads, head_dim, dtype, device) for _ in range(4)]
    TorchOps().write_kv(key, value, caches[0], caches[1], slots)
    launches = kernel_target.num_kernel_launches()
    kernel_target.ops.write_kv(key, value, caches[2], caches[3], slots)
    kernel_target.synchronize()
    kernel_target.assert_launched(launches)
    assert_same_bits(caches[2], caches[0])
    assert_same_bits(caches[3], caches[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("src", "dst"),
    [([3, 5, 1], [7, 0, 2]), ([3, 5, 1], [7, 3, 0])],
    ids=["disjoint", "chained_reads_before_writes"],
)
def test_copy_blocks_matches_the_reference_across_layers(kernel_target, dtype, src, dst):
    device = kernel_target.device
    generator = torch.Generator().manual_seed(len(src))
    originals = [torch.randn(8, 16, 2, 64, generator=generator).to(dtype).to(device) for _ in range(6)]
    expected = [cache.clone() for cache in originals]
    actual = [cache.clone() for cache in originals]
    TorchOps().copy_blocks(expected, src, dst)
    launches = kernel_target.num_kernel_launches()
    kernel_target.ops.copy_blocks(actual, src, dst)
    kernel_target.synchronize()
    kernel_target.assert_launched(launches)
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swap_out_and_in_through_pinned_host_memory(kernel_target, dtype):
    device = kernel_target.device
    generator = torch.Generator().manual_seed(9)
    device_caches = [torch.randn(12, 16, 4, 128, generator=generator).to(dtype).to(device) for _ in range(4)]
    host_caches = [
        kernel_target.host_buffer(torch.full((10, 16, 4, 128), float("nan"), dtype=dtype)) for _ in range(4)
    ]
    expected_host = [cache.clone() for cache in host_caches]
    TorchOps().swap_blocks(device_caches, expected_host, [11, 2, 5], [0, 9, 4])
    launches = kernel_target.num_kernel_launches()
    kernel_target.ops.swap_blocks(device_caches, host_caches, [11, 2, 5], [0, 9, 4])
    kernel_target.assert_launched(launches)
    for got, want in zip(host_caches, expected_host, strict=True):
        assert_same_bits(got, want)
    restored = [torch.zeros_like(cache) for cache in device_caches]
    kernel_target.ops.swap_blocks(host_caches, restored, [0, 9, 4], [1, 2, 3])
    for got, original in zip(restored, device_caches, strict=True):
        assert torch.equal(got[[1, 2, 3]], original[[11, 2, 5]])
        assert torch.equal(got[[0, 4, 5]], torch.zeros_like(got[[0, 4, 5]]))


def test_block_ids_outside_the_pool_are_rejected(kernel_target):
    caches = [torch.zeros(4, 16, 2, 64, device=kernel_target.device)]
    with pytest.raises(ValueError, match="destination block ids"):
        kernel_target.ops.copy_blocks(caches, [0], [4])
