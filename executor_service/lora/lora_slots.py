"""The device's LoRA slots: every slot's A and B stacked per layer and target module, zero padded."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from executor_service.lora.lora_weights import LoraWeights
from shared.lora.target_modules import LORA_TARGET_MODULES, ProjectionSizes, module_shapes


@dataclass(frozen=True, slots=True)
class SlotContent:
    """Which adapter a slot holds."""

    adapter_name: str
    adapter_path: str
    rank: int
    scaling: float
    target_modules: frozenset[str]


class LoraSlots:
    """`max_loras` slots on the device. For layer l and module m, `lora_a[l][m]` is `[max_loras,
    max_lora_rank, in]` and `lora_b[l][m]` is `[max_loras, out, max_lora_rank]` in the model's dtype.

    Slot s holding an adapter of rank r: rows `[:r]` of `lora_a[l][m][s]` are its `lora_A`, columns
    `[:r]` of `lora_b[l][m][s]` are its `lora_B` times its scaling (folded in here, so one SGMV call
    serves adapters of different scalings); the padding past r, every module the adapter does not
    target and every empty slot are zeros, so `B @ A` of the padded slot is exactly the adapter's
    delta and mixed ranks batch together.
    """

    def __init__(
        self, model: ProjectionSizes, max_loras: int, max_lora_rank: int, dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.device = torch.device(device)
        self.shapes = module_shapes(model)
        self.lora_a: list[dict[str, torch.Tensor]] = [
            {m: torch.zeros(max_loras, max_lora_rank, i, dtype=dtype, device=device)
             for m, (i, _) in self.shapes.items()}
            for _ in range(model.num_layers)
        ]
        self.lora_b: list[dict[str, torch.Tensor]] = [
            {m: torch.zeros(max_loras, o, max_lora_rank, dtype=dtype, device=device)
             for m, (_, o) in self.shapes.items()}
            for _ in range(model.num_layers)
        ]
        self.contents: list[SlotContent | None] = [None] * max_loras

    @property
    def num_layers(self) -> int:
        return len(self.lora_a)

    def load(self, slot: int, adapter_name: str, adapter_path: str, weights: LoraWeights) -> None:
        """Overwrites slot `slot` entirely with `weights` (checked against this model by the reader)."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"LoRA slot {slot} out of range [0, {self.max_loras})")
        config = weights.config
        if config.rank > self.max_lora_rank:
            raise ValueError(
                f"adapter {adapter_name!r} has rank {config.rank} > max_lora_rank {self.max_lora_rank}"
            )
        rank, targets = config.rank, frozenset(config.target_modules)
        for layer in range(self.num_layers):
            for module in LORA_TARGET_MODULES:
                a, b = self.lora_a[layer][module][slot], self.lora_b[layer][module][slot]
                a.zero_()
                b.zero_()
                if module in targets:
                    a[:rank].copy_(weights.lora_a[(layer, module)])
                    b[:, :rank].copy_((weights.lora_b[(layer, module)].float() * config.scaling).to(self.dtype))
        self.contents[slot] = SlotContent(adapter_name, adapter_path, rank, config.scaling, targets)

    def clear(self) -> None:
        """Empties every slot (zeros)."""
        for layer in range(self.num_layers):
            for module in LORA_TARGET_MODULES:
                self.lora_a[layer][module].zero_()
                self.lora_b[layer][module].zero_()
        self.contents = [None] * self.max_loras

    def target_modules(self, slots: Iterable[int]) -> frozenset[str]:
        """The modules any of `slots` targets (an empty slot targets none)."""
        found: set[str] = set()
        for slot in slots:
            content = self.contents[slot]
            if content is not None:
                found |= content.target_modules
        return frozenset(found)

    def check_integrity(self) -> None:
        """Shapes, dtypes and the zero padding of every slot; reads every slot tensor (for tests)."""
        assert len(self.contents) == self.max_loras
        for layer in range(self.num_layers):
            for module, (in_features, out_features) in self.shapes.items():
                a, b = self.lora_a[layer][module], self.lora_b[layer][module]
                assert a.shape == (self.max_loras, self.max_lora_rank, in_features), (layer, module, a.shape)
                assert b.shape == (self.max_loras, out_features, self.max_lora_rank), (layer, module, b.shape)
                assert a.dtype == b.dtype == self.dtype and a.device == b.device == self.device
                for slot, content in enumerate(self.contents):
                    rank = 0 if content is None or module not in content.target_modules else content.rank
                    assert not a[slot, rank:].any(), f"slot {slot} {module} A is not zero past rank {rank}"
                    assert not b[slot, :, rank:].any(), f"slot {slot} {module} B is not zero past rank {rank}"
