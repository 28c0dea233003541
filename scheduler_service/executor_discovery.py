"""Which executor addresses the scheduler drives: the static HOST:PORT targets, and what every
`dns:///NAME:PORT` target resolves to now (a compose service scaled with --scale, a Kubernetes
headless Service)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

DNS_SCHEME = "dns:///"

Resolver = Callable[[str, int], list[str]]


@dataclass(frozen=True, slots=True)
class ExecutorTarget:
    """One --executor value: a fixed address, or a DNS name whose every address is an executor."""

    text: str
    host: str
    port: int
    is_dns: bool

    @classmethod
    def parse(cls, text: str) -> ExecutorTarget:
        """Raises ValueError saying what to write instead."""
        is_dns = text.startswith(DNS_SCHEME)
        rest = text.removeprefix(DNS_SCHEME) if is_dns else text
        host, colon, port = rest.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(
                f"--executor {text!r} is not HOST:PORT or dns:///NAME:PORT; give the executor's port, "
                "e.g. 127.0.0.1:50061 or dns:///executor:50061"
            )
        return cls(text=text, host=host, port=int(port), is_dns=is_dns)


def resolve_host(host: str, port: int) -> list[str]:
    """Every address `host` resolves to, as sorted IP:PORT strings (blocking: run it off the event loop)."""
    addresses = set()
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = str(sockaddr[0])
        addresses.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
    return sorted(addresses)


class ExecutorDiscovery:
    """Resolves the targets into the set of executor addresses; a DNS target that fails to resolve
    keeps its last answer (logged), so a DNS hiccup does not drain every executor."""

    def __init__(self, targets: Sequence[str], resolve: Resolver = resolve_host) -> None:
        self.targets = tuple(ExecutorTarget.parse(text) for text in targets)
        self._resolve = resolve
        self._last: dict[str, list[str]] = {}

    @property
    def has_dns_targets(self) -> bool:
        return any(target.is_dns for target in self.targets)

    def static_addresses(self) -> list[str]:
        return [target.text for target in self.targets if not target.is_dns]

    async def addresses(self) -> list[str]:
        """Static targets as given, then each DNS target's addresses; no address twice."""
        found: list[str] = []
        for target in self.targets:
            if not target.is_dns:
                found.append(target.text)
                continue
            try:
                resolved = await asyncio.to_thread(self._resolve, target.host, target.port)
            except OSError as error:
                resolved = self._last.get(target.text, [])
                log.warning("executor_dns_failed", target=target.text, error=str(error), keeping=resolved)
            if resolved != self._last.get(target.text):
                log.info("executor_dns_resolved", target=target.text, addresses=resolved)
            self._last[target.text] = resolved
            found.extend(resolved)
        return list(dict.fromkeys(found))

