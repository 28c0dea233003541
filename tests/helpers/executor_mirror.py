"""A mirror of a correct executor's KV slots, rebuilt from the plans alone, and the scheduler it checks."""

from __future__ import annotations

from scheduler_service.block_pool import BlockPool
from scheduler_service.kv_cache_manager import KVCacheManager
from scheduler_service.preemption_policy import TransferSpeeds
from scheduler_service.scheduler import Scheduler
from scheduler_service.scheduler_config import SchedulerConfig
from scheduler_service.sequence import Sequence
from shared.step_plan import BlockPairs, SamplingOptions, SequenceId, SequenceOutput, StepPlan, StepResult

GREEDY = SamplingOptions()


def make_scheduler(
    *,
    num_blocks: int = 16,
    block_size: int = 4,
    max_num_batched_tokens: int = 16,
    max_num_seqs: int = 4,
    max_model_len: int = 32,
    num_host_blocks: int = 0,
    preemption_mode: str = "recompute",
    transfer_speeds: TransferSpeeds | None = None,
    enable_prefix_caching: bool = True,
    max_loras: int = 0,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        block_size=block_size,
        num_device_blocks=num_blocks,
        num_host_blocks=num_host_blocks,
        preemption_mode=preemption_mode,
        transfer_speeds=transfer_speeds,
        max_loras=max_loras,
    )
    return Scheduler(config, KVCacheManager(BlockPool(num_blocks), block_size, enable_prefix_caching))


def make_seq(
    sequence_id: int,
    prompt: tuple[int, ...],
    *,
    cache_salt: str | None = None,
    max_num_tokens: int | None = None,
) -> Sequence:
    return Sequence(
        SequenceId(sequence_id),
        prompt,
        arrival_index=sequence_id,
        cache_salt=cache_salt,
        max_num_tokens=max_num_tokens,
    )


def own_prompt(sequence_id: int, num_tokens: int) -> tuple[int, ...]:
    """Tokens of this sequence alone (up to 100 of them), so no prefix is shared by accident."""
    return tuple(100 * sequence_id + i for i in range(num_tokens))


def sampled_token(sequence_id: int, position: int) -> int:
    """The token the mirror samples at `position`: recomputation samples it again."""
    return 1000 * sequence_id + position


class ExecutorMirror:
    """A correct executor rebuilt from the plans alone, down to what each KV slot holds.

    A slot holds the tokens from the start of its sequence through its position: K/V at a position is
    a function of exactly those. Each step applies the plan in the executor's order (drop, swap_out,
    swap_in, add new, extend continued), refuses a sequence it already holds or a block outside its
    pools, writes every scheduled token's slot, and only then checks that each scheduled sequence reads
    its own prefix in every slot it attends to, as the executor writes a layer's K/V for the whole
    batch before that layer's attention reads. Any block shared, swapped or reused wrongly shows up as
    a slot holding other tokens. A sequence whose computed tokens reach the end of its tokens samples
    `sampled_token`; with draft tokens, it keeps those equal to `sampled_token` at their position, then
    the first sample that differs (a correct verifier), and counts only accepted positions as computed.
    Asked for k model drafts, it is its own draft model: its first `num_right_model_drafts` drafts are
    its samples, the rest token 7, and the output names them.
    """

    def __init__(
        self, block_size: int, num_device_blocks: int, num_host_blocks: int = 0, num_right_model_drafts: int = 0
    ) -> None:
        self.num_right_model_drafts = num_right_model_drafts
        self.block_size = block_size
        self.num_device_blocks = num_device_blocks
        self.num_host_blocks = num_host_blocks
        self.device: dict[int, tuple[int, ...]] = {}
        self.host: dict[int, tuple[int, ...]] = {}
        self.token_ids: dict[int, list[int]] = {}
        self.num_computed: dict[int, int] = {}
        self.block_ids: dict[int, list[int]] = {}

    def _copy(
        self,
        pairs: BlockPairs,
        src: dict[int, tuple[int, ...]],
        dst: dict[int, tuple[int, ...]],
        num_src: int,
        num_dst: int,
    ) -> None:
        for src_block, dst_block in pairs.pairs():
            assert 0 <= src_block < num_src and 0 <= dst_block < num_dst
            for offset in range(self.block_size):
                content = src.get(src_block * self.block_size + offset)
                dst.pop(dst_block * self.block_size + offset, None)
                if content is not None:
                    dst[dst_block * self.block_size + offset] = content

    def slot(self, sequence_id: int, position: int) -> int:
        block_id = self.block_ids[sequence_id][position // self.block_size]
        assert 0 <= block_id < self.num_device_blocks
        return block_id * self.block_size + position % self.block_size

    def step(self, plan: StepPlan) -> StepResult:
        assert not (len(plan.swap_out) and len(plan.swap_in)), "a plan swaps out and in"
        for sequence_id in (*plan.finished_sequence_ids, *plan.preempted_sequence_ids):
            del self.token_ids[sequence_id], self.num_computed[sequence_id], self.block_ids[sequence_id]
        self._copy(plan.swap_out, self.device, self.host, self.num_device_blocks, self.num_host_blocks)
        self._copy(plan.swap_in, self.host, self.device, self.num_host_blocks, self.num_device_blocks)
        work: list[tuple[int, int, int, tuple[int, ...]]] = []
        model_drafts: dict[int, tuple[int, ...]] = {}
        for new in plan.new_sequences:
            assert new.sequence_id not in self.token_ids
            self.token_ids[new.sequence_id] = list(new.token_ids)
            self.num_computed[new.sequence_id] = new.num_computed_tokens
            self.block_ids[new.sequence_id] = list(new.block_ids)
            work.append((new.sequence_id, new.num_computed_tokens, new.num_scheduled_tokens, ()))
        for cont in plan.continued_sequences:
            self.block_ids[cont.sequence_id].extend(cont.new_block_ids)
            known = len(self.token_ids[cont.sequence_id])
            drafts = cont.draft_token_ids or tuple(
                sampled_token(cont.sequence_id, known + j) if j < self.num_right_model_drafts else 7
                for j in range(cont.num_model_drafts)
            )
            work.append((cont.sequence_id, self.num_computed[cont.sequence_id], cont.num_scheduled_tokens, drafts))
            model_drafts[cont.sequence_id] = drafts if cont.num_model_drafts else ()
        for sequence_id, start, num_tokens, drafts in work:
            tokens = [*self.token_ids[sequence_id], *drafts]
            assert start + num_tokens <= len(tokens)
            assert not drafts or start + num_tokens == len(tokens), "drafts not computed to their end"
            for position in range(start, start + num_tokens):
                self.device[self.slot(sequence_id, position)] = tuple(tokens[: position + 1])
        outputs = []
        for sequence_id, start, num_tokens, drafts in work:
            tokens = self.token_ids[sequence_id]
            with_drafts = [*tokens, *drafts]
            for position in range(start + num_tokens):
                assert self.device.get(self.slot(sequence_id, position)) == tuple(with_drafts[: position + 1]), (
                    f"sequence {sequence_id} reads wrong K/V at position {position}"
                )
            self.num_computed[sequence_id] = start + num_tokens
            sampled: tuple[int, ...] = ()
            if start + num_tokens == len(with_drafts):
                known = len(tokens)
                num_accepted = 0
                while num_accepted < len(drafts) and drafts[num_accepted] == sampled_token(sequence_id, known + num_accepted):
                    num_accepted += 1
                sampled = (*drafts[:num_accepted], sampled_token(sequence_id, known + num_accepted))
                tokens.extend(sampled)
                self.num_computed[sequence_id] -= len(drafts) - num_accepted
            outputs.append(SequenceOutput(SequenceId(sequence_id), sampled,
                                          draft_token_ids=model_drafts.get(sequence_id, ())))
        return StepResult(step_id=plan.step_id, outputs=tuple(outputs))


def step(scheduler: Scheduler, mirror: ExecutorMirror) -> tuple[StepPlan, list[SequenceOutput]]:
    """Schedules one plan and applies the mirror's result at once (nothing else in flight).

    Checks the scheduler's integrity after each half, and that the mirror holds exactly the block
    table the scheduler holds for every running sequence.
    """
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.check_integrity()
    outputs = scheduler.apply_result(mirror.step(plan))
    scheduler.check_integrity()
    for seq in scheduler.running:
        scheduler_block_ids = scheduler.kv_cache_manager.block_ids(seq.sequence_id)
        assert mirror.block_ids[seq.sequence_id] == list(scheduler_block_ids)
    return plan, outputs
