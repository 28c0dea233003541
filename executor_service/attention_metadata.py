"""Describes one step's flattened variable-length batch to the attention ops."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """The layout of all scheduled tokens of all sequences, concatenated into one tensor.

    Sequence i owns query rows `query_start_loc[i]:query_start_loc[i+1]`. Its context after this
    step's K/V writes holds `context_lens[i]` tokens, of which the last `query_lens[i]` are the new ones,
    so new token j (0-based within the sequence) sits at position `context_lens[i] - query_lens[i] + j`
    and attends to context positions `<=` its own (causal within the new tokens, full over the cached
    prefix). Token t of a sequence lives in slot `block_tables[i, t // block_size] * block_size +
    t % block_size`.

    Tensors live on the compute device; the `*_cpu` tuples are host copies for backends that loop
    over sequences (the torch reference) so they never synchronise with the device.
    """

    # [num_tokens] int64: where each new token's K/V is written.
    slot_mapping: torch.Tensor
    # [num_seqs + 1] int32: cumulative query lengths, starting at 0.
    query_start_loc: torch.Tensor
    # [num_seqs] int32: tokens in each sequence's context after this step's writes.
    context_lens: torch.Tensor
    # [num_seqs, max_blocks_per_seq] int32, rows padded with 0 past a sequence's last block.
    block_tables: torch.Tensor
    block_size: int
    query_lens_cpu: tuple[int, ...]
    context_lens_cpu: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens_cpu, default=0)

    @property
    def is_all_decode(self) -> bool:
        """True when every sequence computes exactly one token (the common decode step)."""
        return all(n == 1 for n in self.query_lens_cpu)
