"""Chained content hashes of full KV blocks and the keys they stand for: the prefix cache's lookup keys."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

BlockHash = NewType("BlockHash", bytes)

# The K/V of a block also depends on what is not a token: the LoRA adapter, and a per-request salt
# that keeps tenants apart. None and "" are different keys.
ExtraKeys = tuple[str | None, ...]


@dataclass(frozen=True, slots=True, eq=False)
class BlockKey:
    """Everything the K/V of one full block depends on: the key of the block before it (`parent`,
    None for a sequence's first block), the block's own token ids and the extra keys; `block_hash`
    is the chained hash of all of that, `hash_block(parent's hash, token_ids, extra_keys)`.

    The hash finds a candidate block; `matches` decides. Keys link to their parents, so `matches`
    compares whole prefixes and a hash collision, at any depth, can never make two different
    prefixes share a block. Build keys with `make_block_key`.
    """

    parent: BlockKey | None
    token_ids: tuple[int, ...]
    extra_keys: ExtraKeys
    block_hash: BlockHash

    def matches(self, other: BlockKey) -> bool:
        """Whether both keys stand for the same tokens from the start of the sequence and the same
        extra keys. Walks the parents until the two chains meet in one object (usually at once: keys
        of cached blocks share their parents), so it is O(1) in the common case."""
        a: BlockKey | None = self
        b: BlockKey | None = other
        while a is not b:
            if a is None or b is None or a.token_ids != b.token_ids or a.extra_keys != b.extra_keys:
                return False
            a, b = a.parent, b.parent
        return True


def hash_block(parent_hash: BlockHash | None, token_ids: tuple[int, ...], extra_keys: ExtraKeys) -> BlockHash:
    """SHA-256 of a canonical, length-prefixed encoding of the parent hash, token ids and extra keys."""
    digest = hashlib.sha256()
    digest.update(b"\x00" if parent_hash is None else b"\x01" + parent_hash)
    digest.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    digest.update(struct.pack("<I", len(extra_keys)))
    for extra in extra_keys:
        if extra is None:
            digest.update(b"\x00")
        else:
            encoded = extra.encode("utf-8")
            digest.update(b"\x01" + struct.pack("<I", len(encoded)) + encoded)
    return BlockHash(digest.digest())


def make_block_key(parent: BlockKey | None, token_ids: Sequence[int], extra_keys: ExtraKeys) -> BlockKey:
    token_ids = tuple(token_ids)
    parent_hash = None if parent is None else parent.block_hash
    return BlockKey(parent, token_ids, extra_keys, hash_block(parent_hash, token_ids, extra_keys))
