"""How one paged-attention call is cut into CTAs: work items over the query rows and context splits.

Pure Python on the host copies of the metadata, so it costs no device synchronisation and can be
unit-tested without a GPU. The CUDA backend computes it once per step (all layers share it).
"""

from __future__ import annotations

from dataclasses import dataclass

# A context split is worth its reduction only if each partition holds at least this many tokens.
MIN_PARTITION_TOKENS = 256
# Partitions are a whole number of the kernel's K/V tiles (at most 64 tokens).
PARTITION_ALIGN_TOKENS = 64
# Enough CTAs to fill every SM at the occupancy the kernel is built for (kPwAttentionMinBlocksPerSm).
TARGET_CTAS_PER_SM = 4
# Passed as the partition size when the context is not split: larger than any context.
UNSPLIT_PARTITION_TOKENS = 1 << 30


@dataclass(frozen=True, slots=True)
class AttentionLaunchPlan:
    """`work_items[i]` = (sequence index, first query row within the sequence, number of rows).

    The grid is `(len(work_items), num_kv_heads, num_splits)`; split s of an item covers context
    positions `[s * partition_tokens, (s + 1) * partition_tokens)`. Items are ordered heaviest first
    (the most context to read) so that long ones do not start last.
    """

    work_items: tuple[tuple[int, int, int], ...]
    num_splits: int
    partition_tokens: int

    @property
    def is_split(self) -> bool:
        return self.num_splits > 1


def rows_per_item(query_len: int, group: int, max_rows: int) -> int:
    """Query tokens per CTA: a CTA holds `tokens * group` rows of one KV head, at most `max_rows`."""
    if group > max_rows:
        raise ValueError(
            f"a GQA group of {group} query heads per KV head exceeds the kernel's {max_rows} rows"
        )
    return 1 if query_len == 1 else max(1, max_rows // group)


def plan_attention_launch(
    query_lens: tuple[int, ...],
    context_lens: tuple[int, ...],
    group: int,
    num_kv_heads: int,
    num_sms: int,
    max_rows: int,
) -> AttentionLaunchPlan:
    """Work items covering every query row once, and the context split for this batch.

    The context is split (flash decoding) only when the unsplit grid would leave SMs idle and the
    longest context is long enough for partitions of at least MIN_PARTITION_TOKENS.
    """
    if len(query_lens) != len(context_lens):
        raise ValueError(f"{len(query_lens)} query lengths but {len(context_lens)} context lengths")
    items: list[tuple[int, int, int]] = []
    ends: list[int] = []
    for seq, (query_len, context_len) in enumerate(zip(query_lens, context_lens, strict=True)):
        if query_len > context_len:
            raise ValueError(
                f"sequence {seq} computes {query_len} tokens but its context holds {context_len}"
            )
        step = rows_per_item(query_len, group, max_rows)
        for first_row in range(0, query_len, step):
            num_rows = min(step, query_len - first_row)
            items.append((seq, first_row, num_rows))
            ends.append(context_len - query_len + first_row + num_rows)
    order = sorted(range(len(items)), key=lambda i: -ends[i])
    work_items = tuple(items[i] for i in order)
    max_context = max(ends, default=0)
    base_ctas = len(work_items) * num_kv_heads
    wanted = -(-num_sms * TARGET_CTAS_PER_SM // max(base_ctas, 1))
    num_splits = min(wanted, max_context // MIN_PARTITION_TOKENS)
    if num_splits <= 1:
        return AttentionLaunchPlan(work_items, 1, UNSPLIT_PARTITION_TOKENS)
    partition = -(-max_context // num_splits)
    partition = -(-partition // PARTITION_ALIGN_TOKENS) * PARTITION_ALIGN_TOKENS
    return AttentionLaunchPlan(work_items, -(-max_context // partition), partition)
