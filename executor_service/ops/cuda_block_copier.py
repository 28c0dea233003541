"""Block copy (device -> device) and swap (device <-> pinned host) for many caches in one kernel launch.

Every cache of a KV pool has the same block shape, so one launch copies all (pair, cache) blocks:
the kernel gets tables of base addresses. Pinned host memory is addressed by the GPU directly
(mapped, unified addressing), so a swap is one launch too instead of one memcpy per block and layer.
"""

from __future__ import annotations

import numpy as np
import torch

from executor_service.ops import cuda_kernels as catalog
from executor_service.ops.base import check_block_pairs
from executor_service.ops.kernel_runtime import KernelLaunch, KernelRuntime, pointer


def _block_bytes(cache: torch.Tensor) -> int:
    return cache[0].numel() * cache.element_size() if cache.shape[0] > 0 else 0


def _word_bytes(block_bytes: int) -> int | None:
    for word_bytes in sorted(catalog.BLOCK_COPY_WORDS, reverse=True):
        if block_bytes % word_bytes == 0:
            return word_bytes
    return None


def _check_block_ids(block_ids: list[int], num_blocks: int, role: str) -> None:
    if min(block_ids) < 0 or max(block_ids) >= num_blocks:
        raise ValueError(
            f"{role} block ids must lie in [0, {num_blocks}), got {min(block_ids)}..{max(block_ids)}"
        )


# Base-address tables kept on the device; more distinct tables than this means they are not a pool's.
_MAX_CACHED_TABLES = 64


class CudaBlockCopier:
    """Launches `copy_blocks_kernel` over tables of cache base addresses.

    `copy` and `swap` return False, touching nothing, when the caches are not something the kernel can
    address (non-contiguous, mixed shapes, pageable host memory); the caller then falls back.
    """

    def __init__(self, runtime: KernelRuntime) -> None:
        self.runtime = runtime
        # Base-address tables on the device, keyed by the addresses: a KV pool's caches never move.
        self._tables: dict[tuple[int, ...], torch.Tensor] = {}

    def copy(self, caches: list[torch.Tensor], src_block_ids: list[int], dst_block_ids: list[int]) -> bool:
        """Copies blocks src -> dst within each cache, all sources read before any write."""
        check_block_pairs("copy_blocks", src_block_ids, dst_block_ids)
        if not src_block_ids or not caches:
            return True
        if not self._addressable(caches) or not all(self.runtime.is_device_tensor(cache) for cache in caches):
            return False
        _check_block_ids(src_block_ids, caches[0].shape[0], "source")
        _check_block_ids(dst_block_ids, caches[0].shape[0], "destination")
        device = caches[0].device
        bases = [cache.data_ptr() for cache in caches]
        if set(src_block_ids).isdisjoint(dst_block_ids):
            self._launch(caches[0], device, bases, bases, src_block_ids, dst_block_ids)
            return True
        # A block that is both read and written: stage every source first, as the torch reference does.
        num_pairs = len(src_block_ids)
        scratch = torch.empty(
            (len(caches), num_pairs, *caches[0].shape[1:]), dtype=caches[0].dtype, device=device
        )
        scratch_bases = [scratch[index].data_ptr() for index in range(len(caches))]
        staged = list(range(num_pairs))
        self._launch(caches[0], device, bases, scratch_bases, src_block_ids, staged)
        self._launch(caches[0], device, scratch_bases, bases, staged, dst_block_ids)
        return True

    def swap(
        self,
        src_caches: list[torch.Tensor],
        dst_caches: list[torch.Tensor],
        src_block_ids: list[int],
        dst_block_ids: list[int],
    ) -> bool:
        """Copies `src_caches[k][src] -> dst_caches[k][dst]` across devices; done when it returns."""
        check_block_pairs("swap_blocks", src_block_ids, dst_block_ids, src_caches, dst_caches)
        if not src_block_ids or not src_caches:
            return True
        if not self._addressable(src_caches + dst_caches):
            return False
        _check_block_ids(src_block_ids, src_caches[0].shape[0], "source")
        _check_block_ids(dst_block_ids, dst_caches[0].shape[0], "destination")
        device_caches = [cache for cache in src_caches + dst_caches if self.runtime.is_device_tensor(cache)]
        if not device_caches:
            return False
        device = device_caches[0].device
        src_bases = self._device_addresses(src_caches)
        dst_bases = self._device_addresses(dst_caches)
        if src_bases is None or dst_bases is None:
            return False
        self._launch(src_caches[0], device, src_bases, dst_bases, src_block_ids, dst_block_ids)
        self.runtime.synchronize(device)
        return True

    @staticmethod
    def _addressable(caches: list[torch.Tensor]) -> bool:
        first = caches[0]
        return _word_bytes(_block_bytes(first)) is not None and all(
            cache.is_contiguous() and cache.shape[1:] == first.shape[1:] and cache.dtype == first.dtype
            for cache in caches
        )

    def _device_addresses(self, caches: list[torch.Tensor]) -> list[int] | None:
        addresses = [self.runtime.kernel_address(cache) for cache in caches]
        return None if None in addresses else addresses  # type: ignore[return-value]

    def _table(self, addresses: list[int], device: torch.device) -> torch.Tensor:
        key = (device.index or 0, *addresses)
        table = self._tables.get(key)
        if table is None:
            if len(self._tables) >= _MAX_CACHED_TABLES:
                self._tables.clear()
            table = self.runtime.upload(torch.tensor(addresses, dtype=torch.int64), device)
            self._tables[key] = table
        return table

    def _launch(
        self,
        like: torch.Tensor,
        device: torch.device,
        src_bases: list[int],
        dst_bases: list[int],
        src_block_ids: list[int],
        dst_block_ids: list[int],
    ) -> None:
        block_bytes = _block_bytes(like)
        word_bytes = _word_bytes(block_bytes)
        assert word_bytes is not None
        name = catalog.copy_blocks_kernel(word_bytes)
        ids = self.runtime.upload(torch.tensor([src_block_ids, dst_block_ids], dtype=torch.int64), device)
        self.runtime.launch(
            KernelLaunch(
                catalog.BLOCK_COPY,
                (name,),
                name,
                device,
                (len(src_block_ids), len(src_bases), 1),
                (catalog.BLOCK_COPY_THREADS, 1, 1),
                (
                    pointer(self._table(src_bases, device)),
                    pointer(self._table(dst_bases, device)),
                    pointer(ids[0]),
                    pointer(ids[1]),
                    np.int32(block_bytes // word_bytes),
                ),
            )
        )
