from __future__ import annotations

import pytest

from scheduler_service.block_hash import make_block_key
from scheduler_service.block_pool import BlockPool
from shared.step_plan import BlockId


def ref_counts(pool: BlockPool) -> list[int]:
    return [block.ref_count for block in pool.blocks]


def test_fresh_pool_allocates_in_id_order() -> None:
    pool = BlockPool(6)
    pool.check_integrity()
    assert pool.num_blocks == 6 and pool.num_free_blocks == 6
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(1) == [2]
    pool.check_integrity()
    assert ref_counts(pool) == [1, 1, 1, 0, 0, 0]
    assert pool.num_free_blocks == 3 and pool.num_used_blocks == 3
    assert pool.free_block_ids() == [3, 4, 5]


def test_freed_blocks_join_the_tail_in_the_order_given() -> None:
    pool = BlockPool(5)
    table = pool.allocate(3)
    pool.free(reversed(table))
    pool.check_integrity()
    # A sequence's tail block is evicted before its head block.
    assert pool.free_block_ids() == [3, 4, 2, 1, 0]
    assert pool.allocate(3) == [3, 4, 2]
    pool.check_integrity()


def test_shared_block_is_freed_only_at_the_last_reference() -> None:
    pool = BlockPool(4)
    (block_id,) = pool.allocate(1)
    pool.touch([block_id])
    assert pool.ref_count(block_id) == 2
    pool.free([block_id])
    pool.check_integrity()
    assert pool.ref_count(block_id) == 1
    assert pool.free_block_ids() == [1, 2, 3]
    pool.free([block_id])
    pool.check_integrity()
    assert pool.ref_count(block_id) == 0
    assert pool.free_block_ids() == [1, 2, 3, 0]


def test_touch_revives_a_free_block_from_the_middle_of_the_queue() -> None:
    pool = BlockPool(4)
    pool.touch([BlockId(2)])
    pool.check_integrity()
    assert ref_counts(pool) == [0, 0, 1, 0]
    assert pool.free_block_ids() == [0, 1, 3]
    assert pool.allocate(3) == [0, 1, 3]
    assert pool.num_free_blocks == 0


def test_allocate_clears_the_hash_of_an_evicted_block() -> None:
    pool = BlockPool(2)
    key = make_block_key(None, (1, 2), ())
    (block_id,) = pool.allocate(1)
    assert pool.cache_block(block_id, key)
    pool.free([block_id])
    pool.check_integrity()
    assert pool.free_block_ids() == [1, 0]
    assert pool.get_cached_block(key) == 0
    assert (pool.num_cached_blocks, pool.num_free_cached_blocks()) == (1, 1)
    assert pool.allocate(2) == [1, 0]
    pool.check_integrity()
    assert pool.blocks[0].block_hash is None and pool.blocks[0].block_key is None
    assert pool.get_cached_block(key) is None
    assert pool.num_cached_blocks == 0


def test_allocating_more_than_free_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(ValueError, match="only 1 are free"):
        pool.allocate(2)
    pool.check_integrity()
    assert ref_counts(pool) == [1, 1, 0]
    assert pool.free_block_ids() == [2]


def test_freeing_a_free_block_is_refused() -> None:
    pool = BlockPool(2)
    with pytest.raises(AssertionError):
        pool.free([BlockId(0)])


def test_empty_pool_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def test_check_integrity_catches_a_used_block_in_the_free_queue() -> None:
    pool = BlockPool(3)
    pool.blocks[1].ref_count = 1
    with pytest.raises(AssertionError, match="block 1"):
        pool.check_integrity()
