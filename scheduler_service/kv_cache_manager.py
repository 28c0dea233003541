"""Per-sequence block tables over a shared block pool: which device blocks hold each sequence's KV."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from scheduler_service.block_pool import BlockPool
from shared.step_plan import BlockId, SequenceId


class KVCacheManager:
    """Owns one append-only block table per sequence; token t of a sequence lives in block
    `table[t // block_size]` at offset `t % block_size`.

    Tables only grow until `free` releases the whole table, so the executor can be told about a table
    by the block ids appended since the last step. Invariant: every block's ref_count equals the number
    of tables that hold it.
    """

    def __init__(self, block_pool: BlockPool, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_pool = block_pool
        self.block_size = block_size
        self._block_tables: dict[SequenceId, list[BlockId]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def block_ids(self, sequence_id: SequenceId) -> tuple[BlockId, ...]:
        """The sequence's block table, empty when it holds no blocks."""
        return tuple(self._block_tables.get(sequence_id, ()))

    def sequence_ids(self) -> list[SequenceId]:
        """Sequences that hold a block table."""
        return list(self._block_tables)

    def num_blocks_needed(self, sequence_id: SequenceId, num_tokens: int) -> int:
        """Blocks to append so that the sequence's table covers `num_tokens` tokens (0 if it already does)."""
        num_blocks = -(-num_tokens // self.block_size)
        return max(0, num_blocks - len(self._block_tables.get(sequence_id, ())))

    def allocate_cached_prefix(self, sequence_id: SequenceId, token_ids: Sequence[int]) -> int:
        """Prefix-caching seam, called when a sequence with no blocks is admitted.

        Contract: put the blocks of the longest cached full-block prefix of `token_ids` at the head of
        the sequence's table (touching them) and return how many tokens they cover, a multiple of
        block_size that leaves at least one token to compute (the sampler needs its logits).
        Without a prefix cache nothing is cached: returns 0 and changes nothing.
        """
        assert sequence_id not in self._block_tables, f"sequence {sequence_id} already holds blocks"
        return 0

    def allocate_slots(self, sequence_id: SequenceId, num_tokens: int) -> list[BlockId] | None:
        """Grow the sequence's table to cover `num_tokens` tokens; return the appended block ids.

        Returns None, allocating nothing, when the pool has too few free blocks.
        """
        num_needed = self.num_blocks_needed(sequence_id, num_tokens)
        if num_needed > self.block_pool.num_free_blocks:
            return None
        new_block_ids = self.block_pool.allocate(num_needed)
        self._block_tables.setdefault(sequence_id, []).extend(new_block_ids)
        return new_block_ids

    def free(self, sequence_id: SequenceId) -> None:
        """Release the sequence's table, if it has one, tail block first (evicted before its head)."""
        block_ids = self._block_tables.pop(sequence_id, None)
        if block_ids is not None:
            self.block_pool.free(reversed(block_ids))

    def num_held_blocks(self) -> int:
        """Distinct blocks held by at least one table."""
        return len({block_id for table in self._block_tables.values() for block_id in table})

    def check_integrity(self) -> None:
        self.block_pool.check_integrity()
        references: Counter[BlockId] = Counter()
        for sequence_id, table in self._block_tables.items():
            assert len(set(table)) == len(table), f"sequence {sequence_id} holds a block twice: {table}"
            references.update(table)
        for block in self.block_pool.blocks:
            assert block.ref_count == references[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} but held by "
                f"{references[block.block_id]} tables"
            )
        assert self.block_pool.num_free_blocks + self.num_held_blocks() == self.block_pool.num_blocks
