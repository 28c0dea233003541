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
    """Runs the draft model inside the target's step.

    Contract, per step (`propose`, before the target's forward): the draft computes every known token
    the target computes this step (and any position its own pool still lacks), so its K/V mirrors the
    target's; then, for each sequence that asked for k model drafts, it takes k greedy (argmax) tokens
    in batched steps and writes the K/V of all k into its pool (the k-th costs one more step without
    logits; without it a run accepted whole would leave a gap that a swap, a preemption or a prefix
    hit would carry on). After the target's verification `settle` rolls the draft's computed tokens
    back with the target's, so the draft pool holds exactly the target's computed tokens, under the same
    block ids, after every step whose drafts were the model's; draft tokens the scheduler sent itself
    (n-gram) reach the draft pool only at the sequence's next step. Swaps and copies move both pools.
    The mirroring runs every step, drafting or not: while the adaptive policy drafts nothing (a loaded
    executor) the draft's forward over the step's tokens is still paid, the price of a draft pool that is
    complete whenever drafting resumes.

    Greedy drafts are a point mass q, so the target's verification (keep a draft while the target's own
    sample equals it) stays exact rejection sampling: the output is the target's whatever the draft
    proposes or its pool holds; stale draft K/V would only lower acceptance.
    """

    def __init__(self, model: LlamaForCausalLM, kv_pool: KVPool, path: str, max_model_drafts: int) -> None:
        self.model = model
        self.kv_pool = kv_pool
        self.path = path
        self.max_model_drafts = max_model_drafts

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @staticmethod
    def geometry(config: ModelConfig, block_size: int, dtype: torch.dtype) -> KVGeometry:
        return KVGeometry(config.num_layers, block_size, config.num_kv_heads, config.head_dim, dtype)

    def propose(self, scheduled: list[ScheduledSequence], device: torch.device) -> list[ScheduledSequence]:
        """`scheduled` with each sequence's model drafts filled into `draft_token_ids` (see the class)."""
        block_size = self.kv_pool.geometry.block_size
        mirror: list[ScheduledSequence] = []
        for s in scheduled:
            start = s.state.num_draft_computed_tokens
            assert start <= s.start, f"sequence {s.state.sequence_id}: the draft is ahead of the target"
            mirror.append(ScheduledSequence(s.state, start, s.start + s.num_known_tokens - start))
        model_input = build_model_input(mirror, block_size, device)
        hidden = self.model(model_input.input_ids, model_input.positions, self.kv_pool.device_caches,
                            model_input.metadata)
        for m in mirror:
            m.state.num_draft_computed_tokens = m.end
        drafting = [i for i, s in enumerate(scheduled) if s.num_model_drafts]
        if not drafting:
            return scheduled
        last_rows = np.cumsum(model_input.metadata.query_lens_cpu) - 1
        rows = torch.as_tensor(last_rows[drafting], dtype=torch.int64, device=device)
        drafts: dict[int, list[int]] = {i: [t] for i, t in zip(drafting, self._argmax(hidden[rows]), strict=True)}
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

