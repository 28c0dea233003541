"""Per-sequence block tables over a shared block pool, and the prefix cache's view of each sequence."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler_service import block_hash
from scheduler_service.block_hash import BlockKey, ExtraKeys
from scheduler_service.block_pool import BlockPool
from shared.step_plan import BlockId, SequenceId


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """A prompt's longest cached prefix: its tokens, and those in blocks some table holds now."""

    num_tokens: int
    num_held_tokens: int


class KVCacheManager:
    """Owns one append-only block table per sequence; token t of a sequence lives in block
    `table[t // block_size]` at offset `t % block_size`.

    Tables only grow until `free` releases the whole table, so the executor can be told about a table
    by the block ids appended since the last step. Invariant: every block's ref_count equals the number
    of tables that hold it.

    With `enable_prefix_caching`, full blocks are shared between sequences through the pool's hash
    map. A block's key chains the key of the block before it, its token ids and the sequence's extra
    keys (adapter, cache salt); its hash finds a candidate and the whole key decides, so a reused block
    always holds K/V computed from exactly the same tokens. `cache_full_blocks` offers a sequence's
    blocks to the cache once their tokens are computed; `allocate_cached_prefix` starts a new table
    with the longest cached run. Only full blocks are shared, and a sequence only ever writes past its
    cached blocks, so a shared block is never written.
    """

    def __init__(self, block_pool: BlockPool, block_size: int, enable_prefix_caching: bool = False) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_pool = block_pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._block_tables: dict[SequenceId, list[BlockId]] = {}
        # Per sequence with a table: the keys of the leading blocks already offered to the cache (the
        # cached block's own key object where one matches, so that chains share their parents).
        self._block_keys: dict[SequenceId, list[BlockKey]] = {}

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

    def allocate_cached_prefix(
        self, sequence_id: SequenceId, token_ids: Sequence[int], extra_keys: ExtraKeys = ()
    ) -> int:
        """Called when a sequence with no blocks is admitted: put the blocks of the longest cached
        full-block prefix of `token_ids` at the head of the sequence's table (touching them) and
        return how many tokens they cover, a multiple of block_size that leaves at least one token to
        compute (the sampler needs its logits). Returns 0, changing nothing, when nothing is cached or
        prefix caching is off.
        """
        assert sequence_id not in self._block_tables, f"sequence {sequence_id} already holds blocks"
        if not self.enable_prefix_caching:
            return 0
        keys: list[BlockKey] = []
        hit_block_ids: list[BlockId] = []
        for index in range((len(token_ids) - 1) // self.block_size):
            key = self._block_key(token_ids, index, keys[-1] if keys else None, extra_keys)
            block_id = self.block_pool.get_cached_block(key)
            if block_id is None:
                break
            hit_block_ids.append(block_id)
            cached_key = self.block_pool.blocks[block_id].block_key
            assert cached_key is not None
            keys.append(cached_key)
        if not hit_block_ids:
            return 0
        self.block_pool.touch(hit_block_ids)
        self._block_tables[sequence_id] = hit_block_ids
        self._block_keys[sequence_id] = keys
        return len(hit_block_ids) * self.block_size

    def find_cached_prefix(self, token_ids: Sequence[int], extra_keys: ExtraKeys = ()) -> PrefixHit:
        """What `allocate_cached_prefix` would supply for `token_ids` now, and how much of it other
        tables hold already; changes nothing (no touch, no table), so placement can ask every
        executor's cache."""
        if not self.enable_prefix_caching:
            return PrefixHit(0, 0)
        parent: BlockKey | None = None
        num_blocks = num_held_blocks = 0
        for index in range((len(token_ids) - 1) // self.block_size):
            block_id = self.block_pool.get_cached_block(self._block_key(token_ids, index, parent, extra_keys))
            if block_id is None:
                break
            block = self.block_pool.blocks[block_id]
            parent = block.block_key
            num_blocks += 1
            num_held_blocks += block.ref_count > 0
        return PrefixHit(num_blocks * self.block_size, num_held_blocks * self.block_size)

    def cache_full_blocks(
        self,
        sequence_id: SequenceId,
        token_ids: Sequence[int],
        num_computed_tokens: int,
        extra_keys: ExtraKeys = (),
    ) -> None:
        """Offer the sequence's full blocks among its first `num_computed_tokens` tokens to the cache.

        Called at schedule time, right after `num_computed_tokens` covered them: their K/V is only
        written when that step executes. That is early enough. Plans execute in order, so any later
        step that reuses a block runs after it; and within one step the executor writes every scheduled
        token's K/V of a layer before that layer's attention reads, so a sequence admitted later in the
        same step may read it too. Blocks filled by generated tokens are cached like prompt blocks.
        """
        if not self.enable_prefix_caching:
            return
        table = self._block_tables[sequence_id]
        keys = self._block_keys.setdefault(sequence_id, [])
        num_full_blocks = num_computed_tokens // self.block_size
        assert num_full_blocks <= len(table), f"sequence {sequence_id}: computed tokens outgrow its table"
        for index in range(len(keys), num_full_blocks):
            key = self._block_key(token_ids, index, keys[-1] if keys else None, extra_keys)
            if not self.block_pool.cache_block(table[index], key):
                key = self._canonical_key(key)
            keys.append(key)

    def num_offered_blocks(self, sequence_id: SequenceId) -> int:
        """How many of the sequence's leading blocks were offered to the prefix cache."""
        return len(self._block_keys.get(sequence_id, ()))

    def _block_key(
        self, token_ids: Sequence[int], block_index: int, parent: BlockKey | None, extra_keys: ExtraKeys
    ) -> BlockKey:
        start = block_index * self.block_size
        return block_hash.make_block_key(parent, token_ids[start : start + self.block_size], extra_keys)

    def _canonical_key(self, key: BlockKey) -> BlockKey:
        """The cached block's own key object when one matches `key`, else `key`."""
        block_id = self.block_pool.get_cached_block(key)
        if block_id is None:
            return key
        cached_key = self.block_pool.blocks[block_id].block_key
        assert cached_key is not None
        return cached_key

    def num_shared_prefix_tokens(self, sequence_id: SequenceId) -> int:
        """Tokens at the head of the sequence's table in cached blocks another table also holds: the
        prefix cache keeps them whatever happens to this sequence."""
        num_blocks = 0
        for block_id in self._block_tables.get(sequence_id, ()):
            block = self.block_pool.blocks[block_id]
            if block.block_hash is None or block.ref_count < 2:
                break
            num_blocks += 1
        return num_blocks * self.block_size

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
        self._block_keys.pop(sequence_id, None)
        if block_ids is not None:
            self.block_pool.free(reversed(block_ids))

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the executor's K/V was lost); only valid when no table is held,
        since held blocks would otherwise stay offered but uncached."""
        assert not self._block_tables, f"sequences {sorted(self._block_tables)} still hold blocks"
        self.block_pool.reset_prefix_cache()

    def num_held_blocks(self) -> int:
        """Distinct blocks held by at least one table."""
        return len({block_id for table in self._block_tables.values() for block_id in table})

    def check_integrity(self) -> None:
        self.block_pool.check_integrity()
        references: Counter[BlockId] = Counter()
        for sequence_id, table in self._block_tables.items():
            assert len(set(table)) == len(table), f"sequence {sequence_id} holds a block twice: {table}"
            references.update(table)
            keys = self._block_keys.get(sequence_id, ())
            assert len(keys) <= len(table), f"sequence {sequence_id} offered blocks it does not hold"
            for block_id, key in zip(table, keys):
                cached_key = self.block_pool.blocks[block_id].block_key
                assert cached_key is None or cached_key.matches(key), (
                    f"sequence {sequence_id}: block {block_id} is cached under another key"
                )
        assert set(self._block_keys) <= set(self._block_tables), "keys kept for a freed table"
        if not self.enable_prefix_caching:
            assert self.block_pool.num_cached_blocks == 0, "blocks cached with prefix caching off"
        for block in self.block_pool.blocks:
            assert block.ref_count == references[block.block_id], (
                f"block {block.block_id}: ref_count {block.ref_count} but held by "
                f"{references[block.block_id]} tables"
            )
        assert self.block_pool.num_free_blocks + self.num_held_blocks() == self.block_pool.num_blocks
