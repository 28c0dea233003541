"""The scheduler's view of the device KV blocks: reference counts, the free queue and the prefix cache."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from scheduler_service import block_hash
from scheduler_service.block_hash import BlockHash, BlockKey
from scheduler_service.free_block_queue import FreeBlockQueue
from shared.step_plan import BlockId


@dataclass(slots=True, eq=False)
class Block:
    """One device KV block as the scheduler tracks it; identity, not value, makes two blocks equal.

    A cached block has a `block_key` and is in the pool's hash map under its hash; its K/V can be
    reused by any sequence whose block at the same position has a matching key.
    """

    block_id: BlockId
    ref_count: int = 0
    block_key: BlockKey | None = None
    prev_free: Block | None = None
    next_free: Block | None = None

    @property
    def block_hash(self) -> BlockHash | None:
        return None if self.block_key is None else self.block_key.block_hash


class BlockPool:
    """A fixed set of `num_blocks` blocks, each either free (ref_count 0, in the free queue) or used,
    and a map `block_hash -> block` of the blocks whose K/V is cached (the prefix cache).

    Blocks start free in id order, so the first allocations of a fresh pool are 0, 1, 2, ...
    `free` queues blocks at the tail and `allocate` takes them from the head, so the least recently
    freed block is reused first. Callers free a sequence's blocks in reverse order so that its tail
    blocks are evicted before its head blocks (the head is the prefix other requests are likeliest
    to share).

    A cached block keeps its key while free: `touch` revives it from the middle of the queue, and
    only `allocate` evicts it (forgets its key). The map holds at most one block per hash; a lookup
    returns a block only if its stored key matches the key asked for (same tokens from the start of
    the sequence, same extra keys), so keys with colliding hashes never share a block.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got num_blocks={num_blocks}")
        self.blocks = [Block(BlockId(i)) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self._cached_blocks: dict[BlockHash, Block] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included: they can be allocated at once."""
        return len(self.free_block_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks in the prefix cache, held or free."""
        return len(self._cached_blocks)

    def num_free_cached_blocks(self) -> int:
        """Free blocks that still hold cached K/V (O(free blocks))."""
        return sum(1 for block in self.free_block_queue if block.block_hash is not None)

    def ref_count(self, block_id: BlockId) -> int:
        return self.blocks[block_id].ref_count

    def free_block_ids(self) -> list[BlockId]:
        """Free block ids in eviction order (next to be allocated first)."""
        return [block.block_id for block in self.free_block_queue]

    def cached_block_ids(self) -> list[BlockId]:
        """Cached block ids, in the order they were cached."""
        return [block.block_id for block in self._cached_blocks.values()]

    def allocate(self, num_blocks: int) -> list[BlockId]:
        """Take `num_blocks` blocks from the head of the free queue, each with ref_count 1, evicting
        the cached ones from the prefix cache.

        Raises ValueError when fewer are free; callers check `num_free_blocks` first.
        """
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"cannot allocate {num_blocks} blocks: only {self.num_free_blocks} are free")
        block_ids = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._evict(block)
            block.ref_count = 1
            block_ids.append(block.block_id)
        return block_ids

    def free(self, block_ids: Iterable[BlockId]) -> None:
        """Drop one reference to each block, in the order given; blocks reaching 0 join the queue tail
        (keeping their hash, if cached)."""
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

    def get_cached_block(self, key: BlockKey) -> BlockId | None:
        """The cached block whose key matches `key`, found by its hash; None on a miss or a collision."""
        block = self._cached_blocks.get(key.block_hash)
        if block is None or block.block_key is None or not block.block_key.matches(key):
            return None
        return block.block_id

    def cache_block(self, block_id: BlockId, key: BlockKey) -> bool:
        """Put a held, full, computed block into the prefix cache under `key`.

        Returns False, changing nothing, when another block is already cached under the key's hash (a
        duplicate computed concurrently, or a collision); the block then stays uncached.
        """
        block = self.blocks[block_id]
        assert block.ref_count > 0, f"block {block_id} is free; only held blocks are cached"
        assert block.block_key is None, f"block {block_id} is already cached"
        if key.block_hash in self._cached_blocks:
            return False
        block.block_key = key
        self._cached_blocks[key.block_hash] = block
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every cached block: the K/V in the device blocks can no longer be trusted."""
        for block in self._cached_blocks.values():
            block.block_key = None
        self._cached_blocks.clear()

    def _evict(self, block: Block) -> None:
        if block.block_key is not None:
            del self._cached_blocks[block.block_key.block_hash]
            block.block_key = None

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
            key = block.block_key
            if key is not None:
                assert self._cached_blocks.get(key.block_hash) is block, (
                    f"block {block.block_id} has a hash the prefix cache does not map to it"
                )
                parent_hash = None if key.parent is None else key.parent.block_hash
                assert key.block_hash == block_hash.hash_block(parent_hash, key.token_ids, key.extra_keys), (
                    f"block {block.block_id}: its hash does not match its key"
                )
        cached = [block for block in self.blocks if block.block_hash is not None]
        assert len(cached) == len(self._cached_blocks), (
            f"{len(self._cached_blocks)} hashes map to blocks but {len(cached)} blocks carry a hash"
        )
        used = sum(1 for block in self.blocks if block.ref_count > 0)
        assert len(free_ids) + used == self.num_blocks, (
            f"{len(free_ids)} free + {used} used != {self.num_blocks}"
        )
