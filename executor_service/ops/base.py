"""The ops interface every backend implements: K/V cache writes, paged attention, block copy and swap, SGMV,
and the two elementwise ops a backend may fuse (RMSNorm, rotary embedding; torch reference by default).

Cache layout (per layer): `key_cache` and `value_cache` are `[num_blocks, block_size, num_kv_heads,
head_dim]`; slot = block_id * block_size + offset.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from executor_service.attention_metadata import AttentionMetadata
from executor_service.ops.sgmv_segments import SgmvSegments


class OpsBackend(ABC):
    """One backend of the executor's kernel-level operations.

    Contracts shared by all backends:
      * every op works on the tensors it is given, in place where it says so, on their device;
      * `paged_attention` reads only context tokens `< context_lens[i]` of sequence i and applies the
        causal rule described on `AttentionMetadata`;
      * block ops take (src, dst) pairs as int64 tensors on the destination's device or host lists.
    """

    name: str = "abstract"

    @abstractmethod
    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        """Writes `key`/`value` `[num_tokens, num_kv_heads, head_dim]` into their slots, in place."""

    @abstractmethod
    def paged_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """Attention of `query` `[num_tokens, num_heads, head_dim]` over the paged context.

        Returns `[num_tokens, num_heads, head_dim]`. num_heads is a multiple of num_kv_heads (GQA):
        query head h reads kv head `h // (num_heads // num_kv_heads)`. The new tokens' K/V must already
        be written to the cache.
        """

    @abstractmethod
    def copy_blocks(
        self, caches: list[torch.Tensor], src_block_ids: list[int], dst_block_ids: list[int]
    ) -> None:
        """Copies whole blocks within each cache tensor of `caches` (same device), in place."""

    @abstractmethod
    def swap_blocks(
        self,
        src_caches: list[torch.Tensor],
        dst_caches: list[torch.Tensor],
        src_block_ids: list[int],
        dst_block_ids: list[int],
    ) -> None:
        """Copies blocks `src_caches[k][src] -> dst_caches[k][dst]` between devices (swap in or out).

        Complete (the data is in `dst_caches`) when the call returns.
        """

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`weight * x / sqrt(mean(x^2) + eps)` per row of `x` `[T, H]`, computed in float32 as Hugging
        Face Llama does; a new tensor. This is the reference; a backend's fused kernel equals it to
        float32 rounding."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def rotary_embedding(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`query` `[T, H, D]` and `key` `[T, kvh, D]` rotated by `positions` `[T]` in the rotate-half
        (NeoX / Hugging Face Llama) layout, from float32 tables `cos`, `sin` `[max_positions, D / 2]`.
        Returns the rotated pair; a backend may rotate the given tensors in place and return them, so
        callers must not read the inputs afterwards. This is the reference."""
        cos_t = cos.index_select(0, positions).to(query.dtype)[:, None, :]
        sin_t = sin.index_select(0, positions).to(query.dtype)[:, None, :]
        return _rotate_half(query, cos_t, sin_t), _rotate_half(key, cos_t, sin_t)

    def prepare_lora(self) -> None:
        """Readies the SGMV ops ahead of the first step that uses them (an executor with LoRA on calls
        it at start-up; e.g. the CPU backend builds its kernel then). Default: nothing to do."""

    @abstractmethod
    def sgmv_shrink(
        self,
        x: torch.Tensor,
        lora_a: torch.Tensor,
        out: torch.Tensor,
        segments: SgmvSegments,
        scale: float,
    ) -> None:
        """The LoRA down-projection of a multi-adapter batch, written into `out` in place.

        `x` `[num_tokens, in_features]`, `lora_a` `[num_slots, rank, in_features]` (PEFT's
        `lora_A.weight` per slot), `out` `[num_tokens, rank]` float32. Overwrites all of `out`: row t of
        a segment with slot s >= 0 becomes `scale * x[t] @ lora_a[s].T`, accumulated in float32; every
        other row becomes 0.
        """

    @abstractmethod
    def sgmv_expand(
        self,
        v: torch.Tensor,
        lora_b: torch.Tensor,
        out: torch.Tensor,
        segments: SgmvSegments,
    ) -> None:
        """The LoRA up-projection of a multi-adapter batch, added to `out` in place.

        `v` `[num_tokens, rank]` float32 (what `sgmv_shrink` wrote), `lora_b` `[num_slots,
        out_features, rank]` (PEFT's `lora_B.weight` per slot), `out` `[num_tokens, out_features]`,
        whose rows may be strided (a column slice of a fused projection). Row t of a segment with slot
        s >= 0 becomes `out[t] + v[t] @ lora_b[s].T`, summed in float32 and rounded once to `out`'s
        dtype; other rows are untouched.
        """


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def check_block_pairs(
    op_name: str,
    src_block_ids: list[int],
    dst_block_ids: list[int],
    src_caches: list[torch.Tensor] | None = None,
    dst_caches: list[torch.Tensor] | None = None,
) -> None:
    """The argument checks every backend's block copy and swap share; raises ValueError."""
    if src_caches is not None and dst_caches is not None and len(src_caches) != len(dst_caches):
        raise ValueError(f"{op_name} got {len(src_caches)} source caches but {len(dst_caches)} destinations")
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{op_name} got {len(src_block_ids)} sources but {len(dst_block_ids)} destinations")
