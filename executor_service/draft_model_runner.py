"""Speculative decoding with a draft model: a smaller Llama with the target's vocabulary, its own paged KV
pool under the target's block ids, proposing greedy drafts that the target then verifies."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from executor_service.attention_metadata import AttentionMetadata
from executor_service.input_builder import build_model_input
from executor_service.kv_pool import KVGeometry, KVPool
from executor_service.model.config import ModelConfig
from executor_service.model.llama import LlamaForCausalLM
from executor_service.model.loader import Checkpoint, open_checkpoint
from executor_service.persistent_batch import ScheduledSequence


def open_draft_checkpoint(model_dir: str, target: ModelConfig) -> Checkpoint:
    """The draft checkpoint at `model_dir`, checked against the target; ValueError saying what to fix."""
    if not Path(model_dir).exists():
        raise ValueError(f"the draft model {model_dir!r} does not exist (--speculative-config \"model\")")
    checkpoint = open_checkpoint(model_dir)
    draft = checkpoint.config
    if draft.vocab_size != target.vocab_size:
        raise ValueError(
            f"the draft model {model_dir} has a vocabulary of {draft.vocab_size} tokens but the target "
            f"{target.name or 'model'} has {target.vocab_size}: a draft model must share the target's tokenizer "
            "(make one with `pagewire create-draft-model TARGET DIR --num-layers N`)"
        )
    if draft.max_position_embeddings < target.max_model_len:
        raise ValueError(
            f"the draft model {model_dir} holds {draft.max_position_embeddings} positions, fewer than the "
            f"target's max_model_len {target.max_model_len}"
        )
    return checkpoint


class DraftModelRunner:
    """Runs the draft model inside the target's step, only for the sequences that ask for model drafts.

    Contract, per step (`propose`, before the target's forward): a sequence that asks for k model
    drafts first has its draft pool caught up, from `num_draft_computed_tokens` to the end of its known
    tokens (one batched draft forward, several of at most `max_num_tokens` tokens when the catch-up is
    long, as a chunked prefill is); then the draft takes k greedy (argmax) tokens in batched steps and
    writes the K/V of all k into its pool (the k-th costs one more step without logits, so a run
    accepted whole leaves the draft pool complete). After the target's verification `settle` rolls the
    draft's count back to the target's accepted count. A sequence that drafts nothing this step costs
    the draft nothing: its count stays where it was, and a step where no sequence drafts runs no draft
    forward at all. So `token_ids[:num_draft_computed_tokens]` always have the draft's K/V in its pool
    under the sequence's block ids, never more than `num_computed_tokens` between steps.

    The count only covers what this runner computed for the sequence since the executor last received
    it (`PersistentBatch.apply` starts it at 0): a prefix-cache hit or a swap-in brings target K/V
    whose draft K/V may never have been written, or was written into a block freed and reused since.
    The catch-up recomputes those positions; in a block shared through the prefix cache it writes what
    is there already (same tokens, same positions), so sharing stays consistent. Swaps and copies still
    move both pools (the ModelRunner's block ops), though after a swap-in the draft recomputes.

    Greedy drafts are a point mass q, so the target's verification (keep a draft while the target's own
    sample equals it) stays exact rejection sampling: the output is the target's whatever the draft
    proposes or its pool holds; stale draft K/V would only lower acceptance.
    """

    def __init__(
        self, model: LlamaForCausalLM, kv_pool: KVPool, path: str, max_model_drafts: int, max_num_tokens: int
    ) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.path = path
        self.max_model_drafts = max_model_drafts
        self.max_num_tokens = max_num_tokens

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @staticmethod
    def geometry(config: ModelConfig, block_size: int, dtype: torch.dtype) -> KVGeometry:
        return KVGeometry(config.num_layers, block_size, config.num_kv_heads, config.head_dim, dtype)

    def propose(self, scheduled: list[ScheduledSequence], device: torch.device) -> list[ScheduledSequence]:
        """`scheduled` with each sequence's model drafts filled into `draft_token_ids` (see the class)."""
        drafting = [i for i, s in enumerate(scheduled) if s.num_model_drafts]
        if not drafting:
            return scheduled
        block_size = self.kv_pool.geometry.block_size
        last_hidden = self._catch_up([scheduled[i] for i in drafting], device)
        drafts: dict[int, list[int]] = {i: [t] for i, t in zip(drafting, self._argmax(last_hidden), strict=True)}
        for j in range(1, max(scheduled[i].num_model_drafts for i in drafting) + 1):
            # Draft j (1-based) sits at position (known tokens) - 1 + j; its K/V goes into the draft pool.
            # The last draft's K/V is written too (no logits), so a run accepted whole leaves no gap.
            active = [i for i in drafting if scheduled[i].num_model_drafts >= j]
            positions = [len(scheduled[i].state.token_ids) - 1 + j for i in active]
            metadata = _decode_metadata([scheduled[i].state.block_ids for i in active], positions, block_size, device)
            input_ids = torch.tensor([drafts[i][j - 1] for i in active], dtype=torch.int64).to(device)
            hidden = self.model(input_ids, torch.tensor(positions, dtype=torch.int64).to(device),
                                self.kv_pool.device_caches, metadata)
            proposing = [row for row, i in enumerate(active) if scheduled[i].num_model_drafts > j]
            if proposing:
                rows = torch.tensor(proposing, dtype=torch.int64, device=device)
                for row, token_id in zip(proposing, self._argmax(hidden[rows]), strict=True):
                    drafts[active[row]].append(token_id)
            for i in active:
                scheduled[i].state.num_draft_computed_tokens += 1
        return [
            dataclasses.replace(s, draft_token_ids=tuple(drafts[i])) if i in drafts else s
            for i, s in enumerate(scheduled)
        ]

    def _catch_up(self, drafting: list[ScheduledSequence], device: torch.device) -> torch.Tensor:
        """Computes the known tokens each of `drafting` lacks in the draft pool, packed into forwards of at
        most `max_num_tokens` tokens; the hidden state at each one's last known token, in `drafting` order.
        Each lacks at least that last token: the draft count is at most the target's, which stops
        before the sampled token a drafting step computes."""
        block_size = self.kv_pool.geometry.block_size
        ends = [s.start + s.num_known_tokens for s in drafting]
        for s, end in zip(drafting, ends, strict=True):
            assert s.state.num_draft_computed_tokens <= s.start < end, (
                f"sequence {s.state.sequence_id}: the draft is ahead of the target, or nothing is known to draft from"
            )
        last_hidden: list[torch.Tensor | None] = [None] * len(drafting)
        pending = list(range(len(drafting)))
        while pending:
            chunk: list[tuple[int, ScheduledSequence]] = []
            budget = self.max_num_tokens
            for i in pending:
                if budget == 0:
                    break
                start = drafting[i].state.num_draft_computed_tokens
                num_tokens = min(ends[i] - start, budget)
                chunk.append((i, ScheduledSequence(drafting[i].state, start, num_tokens)))
                budget -= num_tokens
            model_input = build_model_input([m for _, m in chunk], block_size, device)
            hidden = self.model(model_input.input_ids, model_input.positions, self.kv_pool.device_caches,
                                model_input.metadata)
            last_rows = np.cumsum(model_input.metadata.query_lens_cpu) - 1
            for row, (i, m) in zip(last_rows.tolist(), chunk, strict=True):
                m.state.num_draft_computed_tokens = m.end
                if m.end == ends[i]:
                    last_hidden[i] = hidden[row]
            pending = [i for i in pending if last_hidden[i] is None]
        return torch.stack([h for h in last_hidden if h is not None])

    @staticmethod
    def settle(scheduled: list[ScheduledSequence]) -> None:
        """After the target's verification: the draft never counts positions the target rolled back."""
        for s in scheduled:
            state = s.state
            state.num_draft_computed_tokens = min(state.num_draft_computed_tokens, state.num_computed_tokens)

    def _argmax(self, hidden: torch.Tensor) -> list[int]:
        return self.model.compute_logits(hidden).argmax(dim=-1).tolist()


def _decode_metadata(
    block_tables: list[list[int]], positions: list[int], block_size: int, device: torch.device
) -> AttentionMetadata:
    """One new token per sequence at `positions`, attending to everything before it."""
    num_seqs = len(positions)
    width = max(len(table) for table in block_tables)
    tables = np.zeros((num_seqs, width), dtype=np.int64)
    for row, table in enumerate(block_tables):
        tables[row, : len(table)] = table
    position_array = np.asarray(positions, dtype=np.int64)
    slots = tables[np.arange(num_seqs), position_array // block_size] * block_size + position_array % block_size
    context_lens = position_array + 1
    return AttentionMetadata(
        slot_mapping=torch.from_numpy(slots).to(device),
        query_start_loc=torch.arange(num_seqs + 1, dtype=torch.int32).to(device),
        context_lens=torch.from_numpy(context_lens).to(device=device, dtype=torch.int32),
        block_tables=torch.from_numpy(tables).to(device=device, dtype=torch.int32),
        block_size=block_size,
        query_lens_cpu=(1,) * num_seqs,
        context_lens_cpu=tuple(context_lens.tolist()),
    )

