"""The CUDA ops backend: thin typed wrappers over the kernels in `kernels/`, launched by a kernel runtime.

`CudaOps()` uses CuPy and raises ImportError when CuPy or a GPU is missing, which is how
`create_ops_backend("auto", ...)` falls back to the torch backend.
"""

from __future__ import annotations

import numpy as np
import structlog
import torch

from executor_service.attention_metadata import AttentionMetadata
from executor_service.ops import cuda_kernels as catalog
from executor_service.ops import torch_sgmv
from executor_service.ops.base import OpsBackend
from executor_service.ops.cuda_block_copier import CudaBlockCopier
from executor_service.ops.cuda_launch_plan import AttentionLaunchPlan, plan_attention_launch
from executor_service.ops.kernel_runtime import KernelLaunch, KernelRuntime, pointer
from executor_service.ops.sgmv_segments import SgmvSegments
from executor_service.ops.torch_ops import TorchOps

log = structlog.get_logger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _dtype_name(dtype: torch.dtype) -> str | None:
    return _DTYPE_NAMES.get(dtype)


def _is_aligned(tensor: torch.Tensor, row_stride: int) -> bool:
    """True when every row of `tensor` (rows `row_stride` elements apart) starts on 16 bytes."""
    return tensor.data_ptr() % 16 == 0 and (row_stride * tensor.element_size()) % 16 == 0


def _rows_vectorisable(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` itself when each leading-dim row is dense and 16-byte aligned, else a contiguous copy."""
    inner_dense = tensor[0].is_contiguous() if tensor.shape[0] > 0 else True
    if inner_dense and _is_aligned(tensor, tensor.stride(0)):
        return tensor
    return tensor.contiguous()


def _int32(tensor: torch.Tensor) -> torch.Tensor:
    return (
        tensor
        if tensor.dtype == torch.int32 and tensor.is_contiguous()
        else tensor.to(torch.int32).contiguous()
    )


class CudaOps(OpsBackend):
    """Paged attention, K/V writes, block copy/swap and SGMV as CUDA kernels on torch tensors.

    Shapes the kernels were not instantiated for (see `cuda_kernels`) run on `fallback`, with one
    warning per kind of shape. Launches go in stream order on the tensors' device through `runtime`
    (CuPy by default).
    """

    name = "cuda"

    def __init__(self, fallback: OpsBackend | None = None, runtime: KernelRuntime | None = None) -> None:
        if runtime is None:
            from executor_service.ops.cupy_runtime import CupyRuntime

            runtime = CupyRuntime()
        self.runtime = runtime
        self.fallback = fallback if fallback is not None else TorchOps()
        self.block_copier = CudaBlockCopier(runtime)
        self._warned: set[str] = set()
        self._plan_key: tuple[AttentionMetadata, int, int] | None = None
        self._plan: tuple[AttentionLaunchPlan, torch.Tensor] | None = None

    def _falls_back(self, reason: str | None) -> bool:
        if reason is None:
            return False
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning("cuda_ops_fallback", reason=reason, fallback=self.fallback.name)
        return True

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        if key.shape != value.shape or key.dim() != 3 or key_cache.shape != value_cache.shape:
            raise ValueError(f"write_kv got key {tuple(key.shape)}, value {tuple(value.shape)}")
        if key_cache.dim() != 4 or key_cache.shape[2:] != key.shape[1:]:
            raise ValueError(
                f"write_kv: rows {tuple(key.shape[1:])} do not fit cache {tuple(key_cache.shape)}"
            )
        if slot_mapping.shape != (key.shape[0],):
            raise ValueError(f"write_kv: {key.shape[0]} tokens but slot_mapping {tuple(slot_mapping.shape)}")
        if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
            raise ValueError("KV cache tensors must be contiguous to be written by slot")
        dtype_name = _dtype_name(key_cache.dtype)
        row_bytes = key.shape[1] * key.shape[2] * key_cache.element_size()
        if self._falls_back(
            None
            if dtype_name is not None and row_bytes % 16 == 0
            else f"write_kv of {key_cache.dtype} rows of {row_bytes} bytes"
        ):
            self.fallback.write_kv(key, value, key_cache, value_cache, slot_mapping)
            return
        if key.shape[0] == 0:
            return
        key = _rows_vectorisable(key.to(key_cache.dtype))
        value = _rows_vectorisable(value.to(key_cache.dtype))
        slots = slot_mapping if slot_mapping.dtype == torch.int64 else slot_mapping.to(torch.int64)
        name = catalog.write_kv_kernel(dtype_name)
        self.runtime.launch(
            KernelLaunch(
                catalog.CACHE_WRITE,
                (name,),
                name,
                key_cache.device,
                (key.shape[0], 2, 1),
                (catalog.CACHE_WRITE_THREADS, 1, 1),
                (
                    pointer(key),
                    pointer(value),
                    pointer(key_cache),
                    pointer(value_cache),
                    pointer(slots.contiguous()),
                    np.int64(key.stride(0)),
                    np.int64(value.stride(0)),
                    np.int32(row_bytes // 16),
                ),
            )
        )

    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        num_tokens, num_heads, head_dim = query.shape
        _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
        if (
            cache_head_dim != head_dim
            or num_heads % num_kv_heads != 0
            or key_cache.shape != value_cache.shape
        ):
            raise ValueError(
                f"paged_attention: query {tuple(query.shape)} does not match cache {tuple(key_cache.shape)}"
            )
        if block_size != metadata.block_size:
            raise ValueError(f"cache blocks hold {block_size} tokens but metadata says {metadata.block_size}")
        if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
            raise ValueError("KV cache tensors must be contiguous")
        if sum(metadata.query_lens_cpu) != num_tokens:
            raise ValueError(
                f"query has {num_tokens} rows but the metadata schedules {sum(metadata.query_lens_cpu)}"
            )
        group = num_heads // num_kv_heads
        dtype_name = _dtype_name(key_cache.dtype)
        reason = None
        if dtype_name is None or query.dtype != key_cache.dtype:
            reason = f"paged_attention of a {query.dtype} query over a {key_cache.dtype} cache"
        elif head_dim not in catalog.ATTENTION_HEAD_DIMS or block_size not in catalog.ATTENTION_BLOCK_SIZES:
            reason = f"paged_attention with head_dim {head_dim} and block_size {block_size}"
        elif group > catalog.ATTENTION_MAX_ROWS:
            reason = f"paged_attention with {group} query heads per KV head"
        if self._falls_back(reason):
            return self.fallback.paged_attention(query, key_cache, value_cache, metadata, scale)
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
        if num_tokens == 0:
            return out
        if query.stride(2) != 1 or query.stride(1) != head_dim or not _is_aligned(query, query.stride(0)):
            query = query.contiguous()
        plan, work_items = self._launch_plan(metadata, group, num_kv_heads, query.device)
        names = (
            catalog.attention_kernel(dtype_name, head_dim, block_size),
            catalog.attention_reduce_kernel(dtype_name, head_dim),
        )
        partial_out = partial_max = partial_sum = None
        if plan.is_split:
            partial_out = torch.empty(
                (plan.num_splits, num_tokens, num_heads, head_dim), dtype=torch.float32, device=query.device
            )
            partial_max = torch.empty(
                (plan.num_splits, num_tokens, num_heads), dtype=torch.float32, device=query.device
            )
            partial_sum = torch.empty_like(partial_max)
        block_tables = _int32(metadata.block_tables)
        self.runtime.launch(
            KernelLaunch(
                catalog.PAGED_ATTENTION,
                names,
                names[0],
                query.device,
                (len(plan.work_items), num_kv_heads, plan.num_splits),
                (catalog.ATTENTION_THREADS, 1, 1),
                (
                    pointer(out),
                    pointer(partial_out),
                    pointer(partial_max),
                    pointer(partial_sum),
                    pointer(query),
                    pointer(key_cache),
                    pointer(value_cache),
                    pointer(block_tables),
                    pointer(_int32(metadata.query_start_loc)),
                    pointer(_int32(metadata.context_lens)),
                    pointer(work_items),
                    np.int64(query.stride(0)),
                    np.int32(num_heads),
                    np.int32(num_kv_heads),
                    np.int32(block_tables.stride(0)),
                    np.int32(num_tokens),
                    np.int32(min(plan.partition_tokens, 2**31 - 1)),
                    np.float32(scale * 1.4426950408889634),
                ),
            )
        )
        if plan.is_split:
            self.runtime.launch(
                KernelLaunch(
                    catalog.PAGED_ATTENTION,
                    names,
                    names[1],
                    query.device,
                    (num_tokens * num_heads, 1, 1),
                    (head_dim, 1, 1),
                    (
                        pointer(out),
                        pointer(partial_out),
                        pointer(partial_max),
                        pointer(partial_sum),
                        np.int32(num_tokens * num_heads),
                        np.int32(plan.num_splits),
                    ),
                )
            )
        return out

    def _launch_plan(
        self, metadata: AttentionMetadata, group: int, num_kv_heads: int, device: torch.device
    ) -> tuple[AttentionLaunchPlan, torch.Tensor]:
        """The plan and its work items on the device, built once per step: every layer shares `metadata`."""
        if (
            self._plan_key is not None
            and self._plan is not None
            and self._plan_key[0] is metadata
            and self._plan_key[1:] == (group, num_kv_heads)
        ):
            return self._plan
        plan = plan_attention_launch(
            metadata.query_lens_cpu,
            metadata.context_lens_cpu,
            group,
            num_kv_heads,
            self.runtime.num_sms(device),
            catalog.ATTENTION_MAX_ROWS,
        )
        items = torch.tensor(plan.work_items, dtype=torch.int32).reshape(-1, 3)
        work_items = self.runtime.upload(items, device)
        self._plan_key, self._plan = (metadata, group, num_kv_heads), (plan, work_items)
        return self._plan

    def copy_blocks(
        self, caches: list[torch.Tensor], src_block_ids: list[int], dst_block_ids: list[int]
    ) -> None:
        if not self.block_copier.copy(caches, src_block_ids, dst_block_ids):
            self._falls_back("copy_blocks of caches the copy kernel cannot address")
            self.fallback.copy_blocks(caches, src_block_ids, dst_block_ids)

    def swap_blocks(
        self,
        src_caches: list[torch.Tensor],
        dst_caches: list[torch.Tensor],
        src_block_ids: list[int],
        dst_block_ids: list[int],
    ) -> None:
        if not self.block_copier.swap(src_caches, dst_caches, src_block_ids, dst_block_ids):
            self._falls_back("swap_blocks with host caches that are not pinned and mapped")
            self.fallback.swap_blocks(src_caches, dst_caches, src_block_ids, dst_block_ids)

    def sgmv_shrink(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        out: torch.Tensor,
        segments: SgmvSegments,
        scale: float,
    ) -> None:
        torch_sgmv.check_sgmv_shrink_args(x, lora_a, out, segments)
        dtype_name = _dtype_name(x.dtype)
        in_features, rank = x.shape[1], lora_a.shape[1]
        reason = None
        if dtype_name is None or lora_a.dtype != x.dtype:
            reason = f"sgmv_shrink of {x.dtype} x with {lora_a.dtype} weights"
        elif in_features % catalog.vector_elements(dtype_name) != 0:
            reason = f"sgmv_shrink with {in_features} input features"
        if self._falls_back(reason):
            self.fallback.sgmv_shrink(x, lora_a, out, segments, scale)
            return
        if not out.is_contiguous():
            raise ValueError("sgmv_shrink needs a contiguous out")
        out.zero_()
        max_len = segments.max_segment_len
        if max_len == 0 or x.shape[0] == 0:
            return
        x = x if x.stride(1) == 1 and _is_aligned(x, x.stride(0)) else x.contiguous()
        lora_a = lora_a.contiguous()
        chunk = catalog.sgmv_chunk_elements(dtype_name)
        name = catalog.sgmv_shrink_kernel(dtype_name)
        self.runtime.launch(
            KernelLaunch(
                catalog.SGMV,
                (name,),
                name,
                x.device,
                (segments.num_segments, -(-in_features // chunk), -(-max_len // catalog.SGMV_TOKENS_PER_CTA)),
                (catalog.SGMV_THREADS, 1, 1),
                (
                    pointer(out),
                    pointer(x),
                    pointer(lora_a),
                    pointer(_int32(segments.starts)),
                    pointer(_int32(segments.slot_ids)),
                    np.int64(x.stride(0)),
                    np.int32(in_features),
                    np.int32(rank),
                    np.float32(scale),
                ),
            )
        )

    def sgmv_expand(
        self,
        v: torch.Tensor,
        lora_b: torch.Tensor,
        out: torch.Tensor,
        segments: SgmvSegments,
    ) -> None:
        torch_sgmv.check_sgmv_expand_args(v, lora_b, out, segments)
        dtype_name = _dtype_name(out.dtype)
        out_features, rank = lora_b.shape[1], lora_b.shape[2]
        reason = None
        if dtype_name is None or lora_b.dtype != out.dtype or out.stride(1) != 1:
            reason = (
                f"sgmv_expand into {out.dtype} (column stride {out.stride(1)}) with {lora_b.dtype} weights"
            )
        elif rank % catalog.vector_elements(dtype_name) != 0 or rank > catalog.SGMV_MAX_RANK:
            reason = f"sgmv_expand with rank {rank}"
        if self._falls_back(reason):
            self.fallback.sgmv_expand(v, lora_b, out, segments)
            return
        max_len = segments.max_segment_len
        if max_len == 0 or v.shape[0] == 0:
            return
        name = catalog.sgmv_expand_kernel(dtype_name)
        self.runtime.launch(
            KernelLaunch(
                catalog.SGMV,
                (name,),
                name,
                out.device,
                (
                    segments.num_segments,
                    -(-out_features // catalog.SGMV_THREADS),
                    -(-max_len // catalog.SGMV_TOKENS_PER_CTA),
                ),
                (catalog.SGMV_THREADS, 1, 1),
                (
                    pointer(out),
                    pointer(v.contiguous()),
                    pointer(lora_b.contiguous()),
                    pointer(_int32(segments.starts)),
                    pointer(_int32(segments.slot_ids)),
                    np.int64(out.stride(0)),
                    np.int32(out_features),
                    np.int32(rank),
                ),
            )
        )
