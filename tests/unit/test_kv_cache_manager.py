from __future__ import annotations

import pytest

from scheduler_service.block_pool import BlockPool
from scheduler_service.kv_cache_manager import KVCacheManager
from shared.step_plan import SequenceId

A = SequenceId(1)
B = SequenceId(2)


def make_manager(num_blocks: int = 8, block_size: int = 4) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), block_size)


def test_tables_grow_append_only_by_whole_blocks() -> None:
    kv = make_manager()
    assert kv.num_blocks_needed(A, 5) == 2
    assert kv.allocate_slots(A, 5) == [0, 1]
    assert kv.num_blocks_needed(A, 8) == 0
    assert kv.allocate_slots(A, 8) == []
    assert kv.allocate_slots(B, 1) == [2]
    assert kv.allocate_slots(A, 9) == [3]
    kv.check_integrity()
    assert kv.block_ids(A) == (0, 1, 3)
    assert kv.block_ids(B) == (2,)
    assert kv.num_held_blocks() == 4
    assert kv.num_free_blocks == 4
    assert kv.allocate_slots(A, 4) == []
    assert kv.block_ids(A) == (0, 1, 3)


def test_allocation_that_does_not_fit_allocates_nothing() -> None:
    kv = make_manager(num_blocks=4)
    assert kv.allocate_slots(A, 8) == [0, 1]
    assert kv.allocate_slots(B, 12) is None
    assert kv.block_ids(B) == ()
    assert kv.sequence_ids() == [A]
    assert kv.allocate_slots(A, 17) is None
    kv.check_integrity()
    assert kv.block_ids(A) == (0, 1)
    assert kv.num_free_blocks == 2


def test_free_releases_the_tail_block_first() -> None:
    kv = make_manager(num_blocks=6)
    kv.allocate_slots(A, 12)
    kv.allocate_slots(B, 4)
    kv.free(A)
    kv.check_integrity()
    assert kv.block_ids(A) == ()
    assert kv.block_pool.free_block_ids() == [4, 5, 2, 1, 0]
    kv.free(A)
    kv.free(B)
    kv.check_integrity()
    assert kv.num_free_blocks == 6
    assert kv.block_pool.free_block_ids() == [4, 5, 2, 1, 0, 3]


def test_without_a_prefix_cache_nothing_is_cached() -> None:
    kv = make_manager()
    assert kv.allocate_cached_prefix(A, list(range(9))) == 0
    assert kv.block_ids(A) == ()
    assert kv.num_free_blocks == 8


def test_check_integrity_catches_a_reference_no_table_holds() -> None:
    kv = make_manager()
    kv.allocate_slots(A, 4)
    kv.block_pool.touch([0])
    with pytest.raises(AssertionError, match="block 0: ref_count 2 but held by 1"):
        kv.check_integrity()


def test_block_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(BlockPool(2), 0)
