"""Which adapter each LoRA slot of one executor holds, which running sequences pin it, and the loads the
next plan must carry."""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from scheduler_service.lora.adapter_registry import Adapter
from shared.step_plan import AdapterLoad


class LoraSlotTable:
    """The scheduler's mirror of an executor's `num_slots` adapter slots.

    A running sequence with an adapter pins its slot (`acquire` ... `release`); a pinned slot is never
    reloaded, so the adapter a sequence computes with cannot change under it. `acquire` of an adapter
    no slot holds picks an empty slot, else the least recently used unpinned one (an unloaded adapter's
    slot before any other), and queues its load; `take_loads` hands the queued loads to the next plan,
    which the executor runs before that plan's forward, so a slot is loaded before any sequence
    computes with it. When every slot is pinned by other adapters, `acquire` returns None: the step
    then holds more distinct adapters than there are slots, and the sequence waits.

    Invariants (`check_integrity`): pins are non-negative and a slot with pins holds an adapter; an
    adapter is in at most one slot; queued loads name slots holding exactly those adapters.
    """

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._adapters: list[Adapter | None] = [None] * num_slots
        self._pins = [0] * num_slots
        self._last_used = [0] * num_slots
        self._clock = itertools.count(1)
        self._pending: dict[int, Adapter] = {}
        self.num_loads = 0

    def slot_of(self, adapter: Adapter) -> int | None:
        for slot, held in enumerate(self._adapters):
            if held is adapter:
                return slot
        return None

    def adapter_at(self, slot: int) -> Adapter | None:
        return self._adapters[slot] if 0 <= slot < self.num_slots else None

    def is_resident(self, adapter: Adapter) -> bool:
        return self.slot_of(adapter) is not None

    def acquire(self, adapter: Adapter) -> int | None:
        """Pin a slot holding `adapter`, loading it into one if needed; None when no slot can be had."""
        slot = self.slot_of(adapter)
        if slot is None:
            slot = self._victim()
            if slot is None:
                return None
            self._adapters[slot] = adapter
            self._pending[slot] = adapter
            self.num_loads += 1
        self._pins[slot] += 1
        self._last_used[slot] = next(self._clock)
        return slot

    def release(self, slot: int) -> None:
        assert self._pins[slot] > 0, f"LoRA slot {slot} released more often than acquired"
        self._pins[slot] -= 1

    def take_loads(self) -> tuple[AdapterLoad, ...]:
        loads = tuple(
            AdapterLoad(slot=slot, adapter_name=adapter.name, adapter_path=adapter.path)
            for slot, adapter in sorted(self._pending.items())
        )
        self._pending.clear()
        return loads

    def reset(self) -> None:
        """The executor's slots hold nothing we can trust (a new stream): forget every adapter. Only
        when no sequence pins a slot."""
        assert not any(self._pins), "reset with pinned LoRA slots"
        self._adapters = [None] * self.num_slots
        self._last_used = [0] * self.num_slots
        self._pending.clear()

    def resident(self) -> list[Adapter]:
        return [adapter for adapter in self._adapters if adapter is not None]

    def _victim(self) -> int | None:
        free = [slot for slot in range(self.num_slots) if self._pins[slot] == 0]
        if not free:
            return None

        def rank(slot: int) -> tuple[bool, bool, int]:
            held = self._adapters[slot]
            return (held is not None, held is not None and held.is_registered, self._last_used[slot])

        return min(free, key=rank)

    def check_integrity(self, pinned_slots: Iterable[int] = ()) -> None:
        """`pinned_slots`: the lora_slot of every running sequence, one entry each."""
        counts = [0] * self.num_slots
        for slot in pinned_slots:
            counts[slot] += 1
        assert counts == self._pins, f"LoRA slot pins {self._pins} != running sequences' slots {counts}"
        for slot, pins in enumerate(self._pins):
            assert pins == 0 or self._adapters[slot] is not None, f"LoRA slot {slot} is pinned but empty"
        held = [id(a) for a in self._adapters if a is not None]
        assert len(held) == len(set(held)), "an adapter is in two LoRA slots"
        for slot, adapter in self._pending.items():
            assert self._adapters[slot] is adapter, f"queued load of slot {slot} is stale"
