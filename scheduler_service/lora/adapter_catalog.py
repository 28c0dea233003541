"""The scheduler's LoRA front desk: whether LoRA is on, the model adapters are checked against, and the
registry of adapters by name."""

from __future__ import annotations

import asyncio

import structlog

from scheduler_service.lora.adapter_files import AdapterSpec, LoraModelShape, inspect_adapter
from scheduler_service.lora.adapter_registry import Adapter, AdapterRegistry
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

log = structlog.get_logger(__name__)

MAX_ADAPTER_NAME_BYTES = 256


class AdapterCatalog:
    """Checks and registers adapters. `bind` (once the first executor described itself) gives the
    model shape and the executors' largest rank; before it, loading answers UNAVAILABLE.

    `inspect` only reads files and may run on a worker thread; everything else runs on the event loop.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.registry = AdapterRegistry()
        self._shape: LoraModelShape | None = None
        self._max_rank = 0

    def bind(self, shape: LoraModelShape, max_rank: int) -> None:
        self._shape, self._max_rank = shape, max_rank

    def inspect(self, name: str, path: str) -> AdapterSpec:
        """The adapter at `path`, checked against the model; raises InvalidArgument saying what is wrong."""
        self._check_enabled()
        _check_name(name)
        if self._shape is None:
            raise Unavailable("the scheduler is not connected to an executor yet; retry shortly")
        if not path:
            raise InvalidArgument("give the adapter's directory (path / lora_path)")
        try:
            return inspect_adapter(path, self._shape, self._max_rank)
        except ValueError as error:
            raise InvalidArgument(f"cannot load adapter {name!r}: {error}") from None

    async def load(self, name: str, path: str) -> Adapter:
        """Reads and checks the adapter off the event loop, then registers it (see `register`)."""
        self._check_enabled()
        spec = await asyncio.to_thread(self.inspect, name, path)
        adapter, is_new = self.register(name, spec)
        if is_new:
            log.info("adapter_loaded", name=name, path=adapter.path, rank=spec.rank,
                     target_modules=list(spec.target_modules))
        return adapter

    def register(self, name: str, spec: AdapterSpec) -> tuple[Adapter, bool]:
        self._check_enabled()
        return self.registry.register(name, spec)

    def unregister(self, name: str) -> Adapter:
        self._check_enabled()
        adapter = self.registry.unregister(name)
        log.info("adapter_unloaded", name=name, path=adapter.path)
        return adapter

    def lookup(self, name: str) -> Adapter:
        """The adapter a request names; NotFound when unknown (or LoRA is off)."""
        if not self.enabled:
            raise NotFound(f"unknown adapter {name!r}: LoRA is off (start the server with --enable-lora)")
        return self.registry.lookup(name)

    def adapters(self) -> list[Adapter]:
        return self.registry.adapters()

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise FailedPrecondition("LoRA is off: start the server with --enable-lora to load adapters")

    def check_integrity(self) -> None:
        self.registry.check_integrity()


def _check_name(name: str) -> None:
    if not name or len(name.encode()) > MAX_ADAPTER_NAME_BYTES or not name.isprintable():
        raise InvalidArgument(f"an adapter name must be 1 to {MAX_ADAPTER_NAME_BYTES} printable bytes, got {name!r}")
