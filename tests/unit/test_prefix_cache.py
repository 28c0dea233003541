"""The prefix cache inside the KV cache manager: hits, reference counts, eviction order, collisions."""

from __future__ import annotations

import pytest

from scheduler_service import block_hash
from scheduler_service.block_hash import BlockHash
from scheduler_service.block_pool import BlockPool
from scheduler_service.kv_cache_manager import KVCacheManager
from shared.step_plan import SequenceId

A, B, C, D = (SequenceId(i) for i in (1, 2, 3, 4))
PREFIX = (10, 11, 12, 13, 14, 15, 16, 17)


def make_manager(num_blocks: int = 8, block_size: int = 4) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), block_size, enable_prefix_caching=True)


def ref_counts(kv: KVCacheManager) -> list[int]:
    return [block.ref_count for block in kv.block_pool.blocks]


def compute(kv: KVCacheManager, sequence_id: SequenceId, tokens: tuple[int, ...], extra: tuple = ()) -> int:
    """Admit `tokens` as a new sequence and compute all of them; returns the cached tokens it reused."""
    num_cached = kv.allocate_cached_prefix(sequence_id, tokens, extra)
    assert kv.allocate_slots(sequence_id, len(tokens)) is not None
    kv.cache_full_blocks(sequence_id, tokens, len(tokens), extra)
    kv.check_integrity()
    return num_cached


def test_a_shared_prefix_is_reused_with_reference_counts_up() -> None:
    kv = make_manager()
    assert compute(kv, A, PREFIX + (1, 2)) == 0
    assert kv.block_ids(A) == (0, 1, 2)
    assert kv.block_pool.cached_block_ids() == [0, 1]

    num_cached = kv.allocate_cached_prefix(B, PREFIX + (3, 4, 5))
    kv.check_integrity()
    assert num_cached == 8
    assert kv.block_ids(B) == (0, 1)
    assert ref_counts(kv) == [2, 2, 1, 0, 0, 0, 0, 0]
    assert kv.allocate_slots(B, 11) == [3]
    assert kv.num_shared_prefix_tokens(A) == kv.num_shared_prefix_tokens(B) == 8
    kv.free(A)
    kv.check_integrity()
    assert ref_counts(kv) == [1, 1, 0, 1, 0, 0, 0, 0]
    assert kv.num_shared_prefix_tokens(B) == 0


def test_the_last_token_is_always_computed() -> None:
    kv = make_manager()
    compute(kv, A, PREFIX)
    # All 8 tokens are cached, but the sampler needs the logits of the last one: only block 0 is reused.
    assert kv.allocate_cached_prefix(B, PREFIX) == 4
    assert kv.block_ids(B) == (0,)
    assert kv.allocate_cached_prefix(C, PREFIX + (99,)) == 8
    assert kv.allocate_cached_prefix(D, PREFIX[:4]) == 0
    kv.check_integrity()
    assert kv.block_ids(D) == ()


def test_a_hit_stops_at_the_first_block_that_differs() -> None:
    kv = make_manager()
    compute(kv, A, PREFIX + (1, 2, 3, 4, 5))
    changed = PREFIX[:4] + (0,) + PREFIX[5:] + (1, 2, 3, 4, 5)
    assert kv.allocate_cached_prefix(B, changed) == 4


def test_freed_cached_blocks_are_evicted_tail_first_and_least_recently_freed_first() -> None:
    kv = make_manager(num_blocks=8)
    compute(kv, A, PREFIX + (1, 2, 3, 4, 5))  # blocks 0, 1, 2 full and cached; block 3 partial
    other = (50, 51, 52, 53, 54)
    compute(kv, B, other)  # blocks 4 (cached), 5
    kv.free(A)
    kv.free(B)
    kv.check_integrity()
    assert kv.block_pool.free_block_ids() == [6, 7, 3, 2, 1, 0, 5, 4]
    assert kv.block_pool.num_free_blocks == 8
    assert (kv.block_pool.num_cached_blocks, kv.block_pool.num_free_cached_blocks()) == (4, 4)

    assert kv.allocate_slots(C, 16) == [6, 7, 3, 2]  # evicts A's tail block 2 only
    kv.check_integrity()
    assert kv.block_pool.cached_block_ids() == [0, 1, 4]
    assert kv.allocate_cached_prefix(D, PREFIX + (1, 2, 3, 4, 5)) == 8
    assert kv.block_ids(D) == (0, 1)
    kv.free(D)
    # Revived and freed again: A's head blocks are now the most recently freed.
    assert kv.block_pool.free_block_ids() == [5, 4, 1, 0]
    assert kv.allocate_slots(SequenceId(9), 8) == [5, 4]
    assert kv.allocate_cached_prefix(SequenceId(10), other) == 0
    kv.check_integrity()


def test_touch_revives_a_cached_block_from_the_middle_of_the_free_queue() -> None:
    kv = make_manager(num_blocks=6)
    compute(kv, A, PREFIX + (1,))
    kv.free(A)
    assert kv.block_pool.free_block_ids() == [3, 4, 5, 2, 1, 0]
    assert kv.allocate_cached_prefix(B, PREFIX[:4] + (7, 7)) == 4
    kv.check_integrity()
    assert kv.block_pool.free_block_ids() == [3, 4, 5, 2, 1]
    assert ref_counts(kv) == [1, 0, 0, 0, 0, 0]


def test_salts_and_adapters_share_nothing() -> None:
    kv = make_manager(num_blocks=16)
    prompt = PREFIX + (1,)
    compute(kv, A, prompt, (None, None))
    assert kv.allocate_cached_prefix(B, prompt, (None, "tenant-b")) == 0
    assert kv.allocate_cached_prefix(C, prompt, ("adapter-x", None)) == 0
    assert kv.allocate_cached_prefix(D, prompt, (None, None)) == 8
    compute(kv, SequenceId(5), prompt, (None, "tenant-b"))
    assert kv.allocate_cached_prefix(SequenceId(6), prompt, (None, "tenant-b")) == 8
    kv.check_integrity()
    assert kv.block_ids(SequenceId(6)) == kv.block_ids(SequenceId(5))[:2]
    assert not set(kv.block_ids(SequenceId(6))) & set(kv.block_ids(A))


def test_a_forced_hash_collision_never_returns_the_wrong_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_hash, "hash_block", lambda parent, tokens, extra: BlockHash(b"collide"))
    kv = make_manager()
    compute(kv, A, PREFIX + (1,))
    # One block per hash: with every hash equal only A's first block got cached.
    assert kv.block_pool.cached_block_ids() == [0]
    assert kv.allocate_cached_prefix(B, (90, 91, 92, 93, 94)) == 0
    assert kv.allocate_cached_prefix(C, PREFIX[:4] + (5, 6, 7, 8, 9)) == 4
    kv.check_integrity()


def test_a_collision_between_parents_cannot_chain_into_a_stranger_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first blocks x and x' collide; a child cached after x must not serve a prefix x' + y."""
    real_hash = block_hash.hash_block
    x, x_prime, y, z = (1, 1, 1, 1), (2, 2, 2, 2), (3, 3, 3, 3), (4, 4, 4, 4)

    def colliding(parent, tokens, extra):
        return real_hash(parent, x if tokens == x_prime else tokens, extra)

    monkeypatch.setattr(block_hash, "hash_block", colliding)
    kv = make_manager(num_blocks=6)
    compute(kv, A, x + y + (0,))
    kv.free(A)

    def move_to_tail(block_id: int) -> None:
        kv.block_pool.touch([block_id])
        kv.block_pool.free([block_id])

    # Evict x's block 0 but keep its child block 1 (x + y) cached.
    move_to_tail(1)
    assert kv.allocate_slots(C, 20) == [3, 4, 5, 2, 0]
    kv.free(C)
    move_to_tail(1)
    assert kv.block_pool.cached_block_ids() == [1]
    compute(kv, B, x_prime + z + (0,))
    assert kv.block_ids(B) == (0, 2, 5)
    # x' is cached under hash(x), so x' + y hashes like x + y: block 1 is found, but its key does not match.
    key_of_x_prime = kv.block_pool.blocks[0].block_key
    assert block_hash.make_block_key(key_of_x_prime, y, ()).block_hash == kv.block_pool.blocks[1].block_hash
    assert kv.allocate_cached_prefix(D, x_prime + y + (0,)) == 4
    assert kv.block_ids(D) == (0,)
    kv.check_integrity()


def test_duplicates_computed_side_by_side_stay_uncached_and_share_parent_keys() -> None:
    kv = make_manager(num_blocks=8)
    for sequence_id in (A, B):
        assert kv.allocate_cached_prefix(sequence_id, PREFIX + (1,)) == 0
        kv.allocate_slots(sequence_id, 9)
    kv.cache_full_blocks(A, PREFIX + (1,), 9)
    kv.cache_full_blocks(B, PREFIX + (1,), 9)
    kv.check_integrity()
    assert kv.block_pool.cached_block_ids() == [0, 1]
    assert kv.block_ids(B) == (3, 4, 5)
    kv.free(A)
    kv.free(B)
    kv.check_integrity()
    assert kv.block_pool.free_block_ids() == [6, 7, 2, 1, 0, 5, 4, 3]
    assert kv.allocate_cached_prefix(C, PREFIX + (1,)) == 8
    assert kv.block_ids(C) == (0, 1)


def test_reset_forgets_every_cached_block() -> None:
    kv = make_manager()
    compute(kv, A, PREFIX + (1,))
    with pytest.raises(AssertionError, match="still hold blocks"):
        kv.reset_prefix_cache()
    kv.free(A)
    kv.reset_prefix_cache()
    kv.check_integrity()
    assert kv.block_pool.num_cached_blocks == 0
    assert kv.allocate_cached_prefix(B, PREFIX + (1,)) == 0


def test_check_integrity_catches_a_hash_map_out_of_step_with_the_blocks() -> None:
    kv = make_manager()
    compute(kv, A, PREFIX + (1,))
    kv.block_pool.blocks[1].block_key = None
    with pytest.raises(AssertionError, match="hashes map to blocks"):
        kv.check_integrity()
