"""The executor's LoRA side of a step: adapter loads through the host cache into device slots."""

from __future__ import annotations

from dataclasses import dataclass

from executor_service.lora.adapter_host_cache import AdapterHostCache
from executor_service.lora.lora_batch import LoraBatch
from executor_service.lora.lora_slots import LoraSlots
from executor_service.lora.lora_weights import LoraWeights
from executor_service.ops.base import OpsBackend
from executor_service.ops.sgmv_segments import SgmvSegments
from shared.errors import FailedPrecondition, InvalidArgument
from shared.step_plan import StepPlan


class AdapterUnreadable(InvalidArgument):
    """The adapter a plan loads into `slot` cannot be read (its files changed since they were checked)."""

    def __init__(self, slot: int, message: str) -> None:
        super().__init__(message)
        self.slot = slot


@dataclass(frozen=True, slots=True)
class PreparedLoad:
    """An adapter load whose weights are read and checked, ready to be copied into its slot."""

    slot: int
    adapter_name: str
    adapter_path: str
    weights: LoraWeights


class LoraManager:
    """Composes the host cache and the device slots for the runner.

    Contract: `prepare` reads every adapter a plan loads (a cached one is not read again) and checks
    that each new sequence's slot will hold an adapter; it raises InvalidArgument (a broken adapter)
    or FailedPrecondition (an empty slot) and changes no slot. `load` then copies the prepared
    adapters into their slots, after the plan's block ops and before its forward. `reset` (a new Step
    stream) empties every slot: the scheduler that opens a stream loads the adapters it uses.
    """

    def __init__(self, host_cache: AdapterHostCache, slots: LoraSlots, ops: OpsBackend) -> None:
        self.host_cache = host_cache
        self.slots = slots
        self.ops = ops

    @property
    def max_loras(self) -> int:
        return self.slots.max_loras

    @property
    def max_lora_rank(self) -> int:
        return self.slots.max_lora_rank

    def prepare(self, plan: StepPlan) -> tuple[PreparedLoad, ...]:
        prepared: list[PreparedLoad] = []
        for load in plan.adapter_loads:
            try:
                weights = self.host_cache.get(load.adapter_name, load.adapter_path)
            except ValueError as error:
                raise AdapterUnreadable(
                    load.slot, f"adapter {load.adapter_name!r} cannot be loaded: {error}"
                ) from error
            prepared.append(PreparedLoad(load.slot, load.adapter_name, load.adapter_path, weights))
        loaded = {p.slot for p in prepared}
        for new in plan.new_sequences:
            slot = new.lora_slot
            if slot is not None and slot not in loaded and self.slots.contents[slot] is None:
                raise FailedPrecondition(
                    f"sequence {new.sequence_id}: LoRA slot {slot} holds no adapter; load one into it first"
                )
        return tuple(prepared)

    def load(self, prepared: tuple[PreparedLoad, ...]) -> None:
        for p in prepared:
            self.slots.load(p.slot, p.adapter_name, p.adapter_path, p.weights)

    def batch(self, segments: SgmvSegments | None, num_tokens: int) -> LoraBatch | None:
        """The step's LoRA state, or None for a step without adapter rows (no LoRA work at all)."""
        if segments is None:
            return None
        return LoraBatch(self.slots, segments, self.ops, num_tokens)

    def reset(self) -> None:
        self.slots.clear()

    def check_integrity(self) -> None:
        self.host_cache.check_integrity()
        self.slots.check_integrity()
