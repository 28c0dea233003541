"""The CUDA SGMV shrink and expand against the torch reference."""

from __future__ import annotations

import pytest
import torch

from executor_service.ops.sgmv_segments import SgmvSegments
from executor_service.ops.torch_ops import TorchOps
from tests.kernels.kernel_checks import RELATIVE_BOUNDS, relative_error

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_segments(num_adapters: int, num_tokens: int, generator: torch.Generator, device) -> SgmvSegments:
    """Contiguous segments over all rows; one in four uses no adapter (slot -1)."""
    cuts = sorted(torch.randperm(num_tokens - 1, generator=generator)[: num_adapters - 1].add(1).tolist())
    starts = [0, *cuts, num_tokens]
    slots = [index % num_adapters if index % 4 != 3 else -1 for index in range(len(starts) - 1)]
    return SgmvSegments.build(starts, slots, device)


def emulated_in_make_test(dtype_name: str, num_adapters: int, in_features: int, **_: object) -> bool:
    """The emulated share of `make test`: every dtype and adapter count on the small shape, the large
    shapes (2-5 s each emulated) with 32 adapters in fp16 and bf16."""
    return in_features == 1000 or (num_adapters == 32 and dtype_name != "fp32")


EMULATED_IN_MAKE_TEST = {"test_shrink_then_expand_match_the_reference": emulated_in_make_test}


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("num_adapters", [1, 8, 32])
@pytest.mark.parametrize(
    ("in_features", "rank", "out_features"), [(1000, 8, 536), (4096, 64, 4096), (2048, 128, 256)]
)
def test_shrink_then_expand_match_the_reference(
    kernel_target, dtype_name, num_adapters, in_features, rank, out_features
):
    device = kernel_target.device
    dtype = DTYPES[dtype_name]
    generator = torch.Generator().manual_seed(num_adapters * 31 + rank)
    num_tokens = 300
    segments = random_segments(num_adapters, num_tokens, generator, device)
    x = torch.randn(num_tokens, in_features, generator=generator).to(dtype).to(device)
    lora_a = (
        (torch.randn(num_adapters, rank, in_features, generator=generator) / in_features**0.5)
        .to(dtype)
        .to(device)
    )
    lora_b = (
        (torch.randn(num_adapters, out_features, rank, generator=generator) / rank**0.5).to(dtype).to(device)
    )
    expected_v = torch.empty(num_tokens, rank, device=device)
    TorchOps().sgmv_shrink(x, lora_a, expected_v, segments, 0.5)
    kernel_target.poison_allocator([num_tokens * rank * 4])
    v = torch.empty(num_tokens, rank, device=device)
    launches = kernel_target.num_kernel_launches()
    kernel_target.ops.sgmv_shrink(x, lora_a, v, segments, 0.5)
    kernel_target.synchronize()
    kernel_target.assert_launched(launches)
    assert relative_error(v, expected_v) <= 2e-5

    # Expand into the middle columns of a wider (fused) output; the others must not change.
    fused = torch.randn(num_tokens, out_features + 24, generator=generator).to(dtype).to(device)
    expected = fused.clone()
    TorchOps().sgmv_expand(expected_v, lora_b, expected[:, 8 : 8 + out_features], segments)
    launches = kernel_target.num_kernel_launches()
    kernel_target.ops.sgmv_expand(expected_v, lora_b, fused[:, 8 : 8 + out_features], segments)
    kernel_target.synchronize()
    kernel_target.assert_launched(launches)
    assert torch.equal(fused[:, :8], expected[:, :8]) and torch.equal(
        fused[:, 8 + out_features :], expected[:, 8 + out_features :]
    )
    no_adapter = torch.cat(
        [
            torch.arange(a, b)
            for a, b, s in zip(
                segments.starts_cpu, segments.starts_cpu[1:], segments.slot_ids_cpu, strict=False
            )
            if s < 0
        ]
        or [torch.arange(0)]
    )
    assert torch.equal(fused[no_adapter.to(device)], expected[no_adapter.to(device)])
    assert relative_error(fused, expected) <= RELATIVE_BOUNDS[dtype]
