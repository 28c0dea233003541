"""The LoRA adapters a scheduler serves, by name."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from scheduler_service.lora.adapter_files import AdapterSpec
from shared.errors import AlreadyExists, NotFound


@dataclass(eq=False, slots=True)
class Adapter:
    """One registration of an adapter, shared by the sequences that use it.

    `key` is unique per registration, so an adapter unloaded and registered again (perhaps from other
    files) shares no cached K/V and no LoRA slot with the old one. An unloaded adapter lives on, no
    longer `is_registered`, in the sequences still using it: they finish with it.
    """

    adapter_id: int
    name: str
    spec: AdapterSpec
    is_registered: bool = True

    @property
    def key(self) -> str:
        return f"{self.adapter_id}:{self.name}"

    @property
    def path(self) -> str:
        return self.spec.path


class AdapterRegistry:
    """Name -> Adapter. Invariant: a registered name maps to exactly one registered Adapter."""

    def __init__(self) -> None:
        self._by_name: dict[str, Adapter] = {}
        self._ids = itertools.count(1)

    def register(self, name: str, spec: AdapterSpec) -> tuple[Adapter, bool]:
        """Returns (adapter, whether it is new). The same name and path again returns the registered one;
        the name with another path raises AlreadyExists."""
        existing = self._by_name.get(name)
        if existing is not None:
            if existing.path == spec.path:
                return existing, False
            raise AlreadyExists(
                f"adapter {name!r} is already loaded from {existing.path}; unload it first or choose another name"
            )
        adapter = Adapter(adapter_id=next(self._ids), name=name, spec=spec)
        self._by_name[name] = adapter
        return adapter, True

    def unregister(self, name: str) -> Adapter:
        """Takes `name` away from new requests (those using it finish); raises NotFound."""
        adapter = self.lookup(name)
        del self._by_name[name]
        adapter.is_registered = False
        return adapter

    def lookup(self, name: str) -> Adapter:
        adapter = self._by_name.get(name)
        if adapter is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise NotFound(f"unknown adapter {name!r}; loaded adapters: {known}")
        return adapter

    def adapters(self) -> list[Adapter]:
        """The registered adapters in registration order."""
        return sorted(self._by_name.values(), key=lambda a: a.adapter_id)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def check_integrity(self) -> None:
        for name, adapter in self._by_name.items():
            assert adapter.name == name and adapter.is_registered, f"adapter {name} is mis-registered"
