"""Block tables for attention tests: drawn from a shuffled pool with spare blocks, so none is contiguous."""

from __future__ import annotations

import torch


def scattered_block_tables(
    context_lens: list[int], block_size: int, generator: torch.Generator, num_spare_blocks: int = 5
) -> tuple[list[list[int]], int]:
    """(one table per context, total blocks in the pool)."""
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + num_spare_blocks
    pool = torch.randperm(num_blocks, generator=generator).tolist()
    tables, taken = [], 0
    for count in needed:
        tables.append(pool[taken : taken + count])
        taken += count
    return tables, num_blocks
