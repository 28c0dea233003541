"""LoRA slots in the scheduler: a step never holds more distinct adapters than slots, a slot is never
reloaded under a sequence using it, loads travel in the plan that first needs them, and preemption,
abort and a replaced stream give slots back. Checked against a mirror of the executor's slots."""

from __future__ import annotations

import random

from scheduler_service.lora.adapter_files import AdapterSpec
from scheduler_service.lora.adapter_registry import Adapter, AdapterRegistry
from scheduler_service.lora.slot_table import LoraSlotTable
from scheduler_service.scheduler import Scheduler
from scheduler_service.sequence import Sequence, SequenceStatus
from shared.lora.adapter_config import LoraAdapterConfig
from shared.step_plan import AdapterLoad, SequenceId, StepPlan, StepResult
from tests.helpers.executor_mirror import ExecutorMirror, make_scheduler, own_prompt
from tests.helpers.random_aborts import maybe_abort_one


def spec(name: str, rank: int = 8) -> AdapterSpec:
    config = LoraAdapterConfig(rank=rank, lora_alpha=16.0, use_rslora=False, target_modules=("q_proj", "v_proj"))
    return AdapterSpec(path=f"/adapters/{name}", config=config)


def adapters(*names: str) -> dict[str, Adapter]:
    registry = AdapterRegistry()
    return {name: registry.register(name, spec(name))[0] for name in names}


def make_seq(sequence_id: int, num_tokens: int, adapter: Adapter | None) -> Sequence:
    return Sequence(SequenceId(sequence_id), own_prompt(sequence_id, num_tokens), arrival_index=sequence_id,
                    adapter=adapter)


class SlotMirror:
    """The executor's view: what each slot holds (from adapter_loads) and the slot each held sequence
    computes with; asserts a sequence's adapter never changes under it."""

    def __init__(self, mirror: ExecutorMirror, num_slots: int) -> None:
        self.mirror = mirror
        self.slots: list[str | None] = [None] * num_slots
        self.held: dict[int, tuple[int, str]] = {}
        self.loads: list[AdapterLoad] = []
        self.max_distinct = 0

    def step(self, plan: StepPlan) -> StepResult:
        for sequence_id in (*plan.finished_sequence_ids, *plan.preempted_sequence_ids):
            self.held.pop(sequence_id, None)
        for load in plan.adapter_loads:
            assert all(slot != load.slot for slot, _ in self.held.values()), f"slot {load.slot} reloaded under a sequence"
            self.slots[load.slot] = load.adapter_path
            self.loads.append(load)
        for new in plan.new_sequences:
            if new.lora_slot is not None:
                assert self.slots[new.lora_slot] is not None, f"slot {new.lora_slot} used before it was loaded"
                self.held[new.sequence_id] = (new.lora_slot, self.slots[new.lora_slot])
        for slot, path in self.held.values():
            assert self.slots[slot] == path
        self.max_distinct = max(self.max_distinct, len({slot for slot, _ in self.held.values()}))
        return self.mirror.step(plan)


def run_step(scheduler: Scheduler, mirror: SlotMirror) -> StepPlan:
    plan = scheduler.schedule()
    assert plan is not None
    scheduler.check_integrity()
    scheduler.apply_result(mirror.step(plan))
    scheduler.check_integrity()
    return plan


def test_the_first_plan_of_an_adapter_loads_it_and_the_sequence_uses_that_slot() -> None:
    a = adapters("a")["a"]
    scheduler = make_scheduler(max_loras=2)
    scheduler.add_sequence(make_seq(1, 5, a))
    scheduler.add_sequence(make_seq(2, 5, None))
    plan = scheduler.schedule()
    assert plan is not None
    assert plan.adapter_loads == (AdapterLoad(slot=0, adapter_name="a", adapter_path="/adapters/a"),)
    assert [(n.sequence_id, n.lora_slot) for n in plan.new_sequences] == [(1, 0), (2, None)]
    scheduler.check_integrity()


def test_a_resident_adapter_is_not_loaded_again() -> None:
    a = adapters("a")["a"]
    scheduler, mirror = make_scheduler(max_loras=2), SlotMirror(ExecutorMirror(4, 16), 2)
    scheduler.add_sequence(make_seq(1, 5, a))
    run_step(scheduler, mirror)
    scheduler.add_sequence(make_seq(2, 5, a))
    plan = run_step(scheduler, mirror)
    assert plan.adapter_loads == () and plan.new_sequences[0].lora_slot == 0
    scheduler.finish_sequence(SequenceId(1))
    scheduler.finish_sequence(SequenceId(2))
    scheduler.add_sequence(make_seq(3, 5, a))
    plan = run_step(scheduler, mirror)
    assert plan.adapter_loads == () and plan.new_sequences[0].lora_slot == 0
    assert len(mirror.loads) == 1


def test_a_third_adapter_waits_for_a_slot_and_nothing_jumps_the_queue() -> None:
    found = adapters("a", "b", "c")
    scheduler, mirror = make_scheduler(max_loras=2, max_num_seqs=4), SlotMirror(ExecutorMirror(4, 16), 2)
    for sequence_id, name in ((1, "a"), (2, "b"), (3, "c")):
        scheduler.add_sequence(make_seq(sequence_id, 3, found[name]))
    scheduler.add_sequence(make_seq(4, 3, None))
    plan = run_step(scheduler, mirror)
    assert {n.sequence_id for n in plan.new_sequences} == {1, 2}
    assert [s.sequence_id for s in scheduler.waiting] == [3, 4]
    run_step(scheduler, mirror)
    assert [s.sequence_id for s in scheduler.waiting] == [3, 4]
    scheduler.finish_sequence(SequenceId(1))
    plan = run_step(scheduler, mirror)
    # a's slot (0) is the free one: c goes there, then the base request behind it.
    assert plan.adapter_loads == (AdapterLoad(slot=0, adapter_name="c", adapter_path="/adapters/c"),)
    assert [(n.sequence_id, n.lora_slot) for n in plan.new_sequences] == [(3, 0), (4, None)]


def test_an_unloaded_adapters_slot_is_reused_before_a_registered_ones() -> None:
    registry = AdapterRegistry()
    a, _ = registry.register("a", spec("a"))
    b, _ = registry.register("b", spec("b"))
    c, _ = registry.register("c", spec("c"))
    table = LoraSlotTable(2)
    slot_a, slot_b = table.acquire(a), table.acquire(b)
    table.release(slot_a)
    table.release(slot_b)
    table.acquire(a)  # a is now the most recently used ...
    table.release(slot_a)
    registry.unregister("a")  # ... but unloaded: its slot goes first
    assert table.acquire(c) == slot_a
    assert table.slot_of(b) == slot_b and table.slot_of(a) is None
    table.check_integrity([slot_a])


def test_preemption_releases_the_slot_and_resume_acquires_it_again() -> None:
    found = adapters("a", "b")
    # 6 blocks of 4: two sequences of 9 tokens outgrow the pool and the later one is preempted.
    scheduler = make_scheduler(max_loras=1, num_blocks=6, max_num_batched_tokens=16, max_model_len=24)
    mirror = SlotMirror(ExecutorMirror(4, 6), 1)
    scheduler.add_sequence(make_seq(1, 9, found["a"]))
    scheduler.add_sequence(make_seq(2, 9, found["a"]))
    scheduler.add_sequence(make_seq(3, 4, found["b"]))
    preempted = False
    for _ in range(40):
        if not scheduler.has_work:
            break
        plan = run_step(scheduler, mirror)
        preempted = preempted or bool(plan.preempted_sequence_ids)
        for seq in list(scheduler.running):
            if seq.num_output_tokens >= 6:
                scheduler.finish_sequence(seq.sequence_id)
    assert preempted and not scheduler.has_work
    assert mirror.max_distinct == 1
    assert [load.adapter_name for load in mirror.loads] == ["a", "b"]


def test_a_replaced_stream_forgets_every_slot_and_loads_again() -> None:
    a = adapters("a")["a"]
    scheduler, mirror = make_scheduler(max_loras=2), SlotMirror(ExecutorMirror(4, 16), 2)
    scheduler.add_sequence(make_seq(1, 5, a))
    run_step(scheduler, mirror)
    scheduler.reset_executor_state()
    scheduler.check_integrity()
    assert scheduler.waiting[0].lora_slot is None
    plan = scheduler.schedule()
    assert plan is not None and plan.adapter_loads == (AdapterLoad(0, "a", "/adapters/a"),)


def test_random_mixed_traffic_keeps_slots_pins_and_blocks_exact() -> None:
    rng = random.Random(7)
    found = adapters(*"abcdefgh")
    choices = [None, *found.values()]
    scheduler = make_scheduler(max_loras=3, num_blocks=24, max_num_seqs=6, max_num_batched_tokens=24,
                               max_model_len=32, num_host_blocks=8, preemption_mode="swap")
    mirror = SlotMirror(ExecutorMirror(4, 24, 8), 3)
    next_id, aborted = 1, set()
    for _ in range(300):
        if rng.random() < 0.4 and next_id < 80:
            scheduler.add_sequence(make_seq(next_id, rng.randint(1, 12), rng.choice(choices)))
            next_id += 1
        maybe_abort_one(scheduler, rng, aborted)
        plan = scheduler.schedule()
        if plan is None:
            continue
        scheduler.check_integrity()
        scheduler.apply_result(mirror.step(plan))
        for seq in list(scheduler.running):
            if seq.num_output_tokens >= rng.randint(2, 10):
                scheduler.finish_sequence(seq.sequence_id)
        scheduler.check_integrity()
    assert mirror.max_distinct <= 3 and len(mirror.loads) > 3
    for seq in [*scheduler.running, *scheduler.waiting]:
        scheduler.abort_sequence(seq.sequence_id)
    scheduler.check_integrity()
    assert scheduler.kv_cache_manager.num_free_blocks == 24
    assert all(pins == 0 for pins in scheduler.lora_slots._pins)


def test_a_sequence_status_after_waiting_for_a_slot_is_still_waiting() -> None:
    found = adapters("a", "b")
    scheduler = make_scheduler(max_loras=1)
    scheduler.add_sequence(make_seq(1, 3, found["a"]))
    scheduler.add_sequence(make_seq(2, 3, found["b"]))
    scheduler.schedule()
    assert scheduler.get_sequence(SequenceId(2)).status is SequenceStatus.WAITING
    assert scheduler.get_sequence(SequenceId(2)).lora_slot is None
