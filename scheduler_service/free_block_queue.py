"""The free blocks of a pool in eviction order, as a doubly linked list with O(1) removal from the middle."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler_service.block_pool import Block


class FreeBlockQueue:
    """Free blocks, least recently freed at the head: `popleft` takes the block to evict next.

    The links live in the blocks themselves (`prev_free`, `next_free`), so `remove` of a block in the
    middle (a freed block revived by a prefix-cache hit) is O(1), as are `append` and `popleft`.
    Invariants: a block is linked at most once; following `next_free` from the head visits exactly
    `len(self)` blocks and ends at the tail; `prev_free` mirrors `next_free`.
    """

    def __init__(self, blocks: Iterable[Block] = ()) -> None:
        self._head: Block | None = None
        self._tail: Block | None = None
        self._num_blocks = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._num_blocks

    def __contains__(self, block: Block) -> bool:
        return block.prev_free is not None or block.next_free is not None or self._head is block

    def __iter__(self) -> Iterator[Block]:
        """Head (next to evict) to tail (most recently freed)."""
        block = self._head
        while block is not None:
            yield block
            block = block.next_free

    def append(self, block: Block) -> None:
        """Link `block` at the tail: it is evicted after every block already queued."""
        assert block not in self, f"block {block.block_id} is already in the free queue"
        block.prev_free = self._tail
        if self._tail is None:
            self._head = block
        else:
            self._tail.next_free = block
        self._tail = block
        self._num_blocks += 1

    def popleft(self) -> Block:
        """Unlink and return the head block; raises IndexError when the queue is empty."""
        if self._head is None:
            raise IndexError("pop from an empty free block queue")
        block = self._head
        self.remove(block)
        return block

    def remove(self, block: Block) -> None:
        """Unlink `block` from wherever it sits in the queue."""
        assert block in self, f"block {block.block_id} is not in the free queue"
        if block.prev_free is None:
            self._head = block.next_free
        else:
            block.prev_free.next_free = block.next_free
        if block.next_free is None:
            self._tail = block.prev_free
        else:
            block.next_free.prev_free = block.prev_free
        block.prev_free = None
        block.next_free = None
        self._num_blocks -= 1

    def check_integrity(self) -> None:
        seen: set[int] = set()
        previous: Block | None = None
        for block in self:
            assert id(block) not in seen, f"block {block.block_id} is linked twice"
            assert block.prev_free is previous, f"block {block.block_id} has a stale prev link"
            seen.add(id(block))
            previous = block
        assert previous is self._tail, "the tail is not the last block reached from the head"
        assert len(seen) == self._num_blocks, f"{len(seen)} blocks linked, {self._num_blocks} counted"
