"""The scheduler's view of the executor's device KV blocks: reference counts and the free queue."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from scheduler_service.free_block_queue import FreeBlockQueue
from shared.step_plan import BlockId


@dataclass(slots=True, eq=False)
class Block:
    """One device KV block as the scheduler tracks it; identity, not value, makes two blocks equal.

    `block_hash` is reserved for prefix caching: the hash of the full block's tokens and its prefix.
    """

    block_id: BlockId
    ref_count: int = 0
    block_hash: int | None = None
    prev_free: Block | None = None
    next_free: Block | None = None


class BlockPool:
    """A fixed set of `num_blocks` blocks, each either free (ref_count 0, in the free queue) or used.

    Blocks start free in id order, so the first allocations of a fresh pool are 0, 1, 2, ...
    `free` queues blocks at the tail and `allocate` takes them from the head, so the least recently
    freed block is reused first. Callers free a sequence's blocks in reverse order so that its tail
    blocks are evicted before its head blocks (the head is the prefix other requests are likeliest
    to share).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got num_blocks={num_blocks}")
        self.blocks = [Block(BlockId(i)) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def ref_count(self, block_id: BlockId) -> int:
        return self.blocks[block_id].ref_count

    def free_block_ids(self) -> list[BlockId]:
        """Free block ids in eviction order (next to be allocated first)."""
        return [block.block_id for block in self.free_block_queue]

    def allocate(self, num_blocks: int) -> list[BlockId]:
        """Take `num_blocks` blocks from the head of the free queue, each with ref_count 1.

        Raises ValueError when fewer are free; callers check `num_free_blocks` first.
        """
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {self.num_free_blocks} are free")
        block_ids = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            # Evicting a block forgets its contents; the prefix cache will drop its hash entry here.
            block.block_hash = None
            block.ref_count = 1
            block_ids.append(block.block_id)
        return block_ids

    def free(self, block_ids: Iterable[BlockId]) -> None:
        """Drop one reference to each block, in the order given; blocks reaching 0 join the queue tail."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than it was referenced"
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_queue.append(block)

    def touch(self, block_ids: Iterable[BlockId]) -> None:
        """Add one reference to each block, taking free ones (a revived cached block) out of the queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                self.free_block_queue.remove(block)
            block.ref_count += 1

    def check_integrity(self) -> None:
        self.free_block_queue.check_integrity()
        free_ids = [block.block_id for block in self.free_block_queue]
        assert len(set(free_ids)) == len(free_ids), f"duplicate free block ids: {free_ids}"
        free_set = set(free_ids)
        for index, block in enumerate(self.blocks):
            assert block.block_id == index, f"block at index {index} has id {block.block_id}"
            assert block.ref_count >= 0, f"block {block.block_id} has ref_count {block.ref_count}"
            is_free = block.block_id in free_set
            assert is_free == (block.ref_count == 0), (
                f"block {block.block_id}: ref_count {block.ref_count} but in free queue: {is_free}"
            )
        used = sum(1 for block in self.blocks if block.ref_count > 0)
        assert len(free_ids) + used == self.num_blocks, (
            f"{len(free_ids)} free + {used} used != {self.num_blocks}"
        )
