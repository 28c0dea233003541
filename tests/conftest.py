"""Shared pytest fixtures: factories for the objects many tests build."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from executor_service.attention_metadata import AttentionMetadata
from executor_service.ops.cpu_kernel_build import CpuKernelUnavailable


def _attention_metadata(
    query_lens: Sequence[int],
    context_lens: Sequence[int],
    block_tables: Sequence[Sequence[int]],
    block_size: int,
    device: str | torch.device = "cpu",
) -> AttentionMetadata:
    """Metadata for sequences whose last `query_lens[i]` of `context_lens[i]` tokens are computed now."""
    slots: list[int] = []
    for query_len, context_len, table in zip(query_lens, context_lens, block_tables, strict=True):
        for position in range(context_len - query_len, context_len):
            slots.append(table[position // block_size] * block_size + position % block_size)
    starts = [0]
    for query_len in query_lens:
        starts.append(starts[-1] + query_len)
    width = max((len(table) for table in block_tables), default=0)
    padded = [list(table) + [0] * (width - len(table)) for table in block_tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        context_lens=torch.tensor(list(context_lens), dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device).reshape(len(block_tables), width),
        block_size=block_size,
        query_lens_cpu=tuple(query_lens),
        context_lens_cpu=tuple(context_lens),
    )


@pytest.fixture
def make_attention_metadata() -> Callable[..., AttentionMetadata]:
    """`make(query_lens, context_lens, block_tables, block_size, device="cpu") -> AttentionMetadata`."""
    return _attention_metadata


@pytest.fixture(scope="module")
def cpu_ops():
    """The compiled CPU ops backend (built once per machine); the test is skipped where it cannot build."""
    from executor_service.ops.cpu_ops import CpuOps

    try:
        return CpuOps()
    except CpuKernelUnavailable as error:
        pytest.skip(str(error))
