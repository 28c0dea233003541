"""The executor's host-memory LRU cache of read LoRA adapters, so loading a cached one is a copy."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from executor_service.lora.lora_weights import LoraWeights, read_lora_weights
from shared.lora.target_modules import ProjectionSizes

DEFAULT_HOST_CACHE_BYTES = 1024**3

AdapterKey = tuple[str, str]


class AdapterHostCache:
    """Adapters read from disk, keyed by (adapter_name, adapter_path), least recently used first.

    Contract: `get` returns the adapter's checked weights, reading its files only on a miss; it then
    evicts the least recently used entries until at most `max_entries` (None: no count bound) entries
    of at most `max_bytes` bytes in all remain. An adapter larger than `max_bytes` on its own is
    returned but not kept. Invariant (`check_integrity`): `num_bytes` is the sum of the entries' bytes
    and both bounds hold.
    """

    def __init__(
        self, model: ProjectionSizes, max_lora_rank: int, max_entries: int | None,
        max_bytes: int = DEFAULT_HOST_CACHE_BYTES,
    ) -> None:
        self.model = model
        self.max_lora_rank = max_lora_rank
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[AdapterKey, LoraWeights] = OrderedDict()
        self.num_bytes = 0
        self.num_reads = 0
        self.num_hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: AdapterKey) -> bool:
        return key in self._entries

    def keys(self) -> list[AdapterKey]:
        """Cached keys, least recently used first."""
        return list(self._entries)

    def get(self, adapter_name: str, adapter_path: str) -> LoraWeights:
        """The adapter's weights, from the cache or read (and checked) from `adapter_path`; a broken
        adapter raises ValueError naming what is wrong and is not cached."""
        key = (adapter_name, adapter_path)
        weights = self._entries.get(key)
        if weights is not None:
            self._entries.move_to_end(key)
            self.num_hits += 1
            return weights
        self.num_reads += 1
        weights = read_lora_weights(Path(adapter_path), self.model, self.max_lora_rank)
        if weights.num_bytes <= self.max_bytes and self.max_entries != 0:
            self._entries[key] = weights
            self.num_bytes += weights.num_bytes
            self._evict()
        return weights

    def _evict(self) -> None:
        while self._entries and (
            self.num_bytes > self.max_bytes
            or (self.max_entries is not None and len(self._entries) > self.max_entries)
        ):
            _, evicted = self._entries.popitem(last=False)
            self.num_bytes -= evicted.num_bytes

    def check_integrity(self) -> None:
        assert self.num_bytes == sum(w.num_bytes for w in self._entries.values()), "byte count drifted"
        assert self.num_bytes <= self.max_bytes, f"{self.num_bytes} bytes cached over {self.max_bytes}"
        if self.max_entries is not None:
            assert len(self._entries) <= self.max_entries, f"{len(self._entries)} entries over {self.max_entries}"
