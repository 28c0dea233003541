from __future__ import annotations

from scheduler_service import block_hash
from scheduler_service.block_hash import BlockHash, hash_block, make_block_key


def test_hash_is_a_deterministic_32_byte_digest() -> None:
    assert hash_block(None, (1, 2, 3, 4), (None, "salt")) == hash_block(None, (1, 2, 3, 4), (None, "salt"))
    assert len(hash_block(None, (1, 2, 3, 4), ())) == 32


def test_every_part_of_the_key_changes_the_hash() -> None:
    parent = hash_block(None, (9, 9), ())
    variants = [
        (None, (1, 2), ()),
        (parent, (1, 2), ()),
        (None, (2, 1), ()),
        (None, (1, 2), (None,)),
        (None, (1, 2), ("",)),
        (None, (1, 2), ("a",)),
        (None, (1, 2), (None, "a")),
        (None, (1, 2), ("a", None)),
        # Length prefixes keep differently split encodings apart.
        (None, (1, 2), ("ab",)),
        (None, (1, 2), ("a", "b")),
        (None, (12,), ()),
    ]
    assert len({hash_block(*variant) for variant in variants}) == len(variants)


def test_keys_chain_their_parents_hash() -> None:
    first = make_block_key(None, [10, 11], ("lora",))
    second = make_block_key(first, [12, 13], ("lora",))
    assert first.block_hash == hash_block(None, (10, 11), ("lora",))
    assert second.parent is first and second.token_ids == (12, 13)
    assert second.block_hash == hash_block(first.block_hash, (12, 13), ("lora",))


def test_matches_compares_whole_prefixes_not_hashes(monkeypatch) -> None:
    monkeypatch.setattr(block_hash, "hash_block", lambda parent, tokens, extra: BlockHash(b"same"))
    a = make_block_key(make_block_key(None, (1, 2), ()), (5, 6), ())
    b = make_block_key(make_block_key(None, (3, 4), ()), (5, 6), ())
    c = make_block_key(make_block_key(None, (1, 2), ()), (5, 6), ())
    assert a.block_hash == b.block_hash == c.block_hash
    assert not a.matches(b) and not b.matches(a)
    assert a.matches(c) and a.matches(a)
    assert not a.matches(make_block_key(a.parent, (5, 6), ("salt",)))
    assert not a.matches(make_block_key(None, (5, 6), ()))
