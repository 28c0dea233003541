"""The executor's host blocks as the scheduler tracks them: which ones hold each swapped-out sequence."""

from __future__ import annotations

from collections import deque

from shared.step_plan import BlockId, SequenceId


class SwapSpace:
    """`num_blocks` host blocks, each free or in exactly one swapped-out sequence's host table.

    Host blocks are never shared: a swapped-out sequence owns a private copy of its K/V. Freed blocks
    join the tail and allocation takes the head, so reuse is least recently freed first.
    Invariant: free + held == num_blocks, and no block is both free and held or held twice.
    A pool of 0 blocks is valid (the executor has no swap space): nothing is ever swapped.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free_block_ids: deque[BlockId] = deque(BlockId(i) for i in range(num_blocks))
        self._host_tables: dict[SequenceId, list[BlockId]] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def holds(self, sequence_id: SequenceId) -> bool:
        return sequence_id in self._host_tables

    def sequence_ids(self) -> list[SequenceId]:
        return list(self._host_tables)

    def block_ids(self, sequence_id: SequenceId) -> tuple[BlockId, ...]:
        """The sequence's host table (host block i holds its device block i's K/V); empty if none."""
        return tuple(self._host_tables.get(sequence_id, ()))

    def allocate(self, sequence_id: SequenceId, num_blocks: int) -> list[BlockId] | None:
        """A host table of `num_blocks` blocks for a sequence that holds none; None, allocating
        nothing, when fewer are free."""
        assert sequence_id not in self._host_tables, f"sequence {sequence_id} is already swapped out"
        assert num_blocks > 0, "swap out at least one block"
        if num_blocks > len(self._free_block_ids):
            return None
        table = [self._free_block_ids.popleft() for _ in range(num_blocks)]
        self._host_tables[sequence_id] = table
        return table

    def free(self, sequence_id: SequenceId) -> None:
        """Release the sequence's host table, if it has one."""
        self._free_block_ids.extend(self._host_tables.pop(sequence_id, ()))

    def check_integrity(self) -> None:
        held = [block_id for table in self._host_tables.values() for block_id in table]
        free = list(self._free_block_ids)
        assert len(set(held)) == len(held), f"a host block is held twice: {sorted(held)}"
        assert len(set(free)) == len(free), f"a host block is free twice: {sorted(free)}"
        assert not set(held) & set(free), f"host blocks both free and held: {sorted(set(held) & set(free))}"
        assert sorted(held + free) == list(range(self.num_blocks)), (
            f"{len(free)} free + {len(held)} held host blocks != {self.num_blocks}"
        )
        for sequence_id, table in self._host_tables.items():
            assert table, f"sequence {sequence_id} holds an empty host table"
