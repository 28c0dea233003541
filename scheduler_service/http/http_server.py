"""Runs an ASGI app with uvicorn as a task on the scheduler's own event loop, sharing it with gRPC and the engine."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import structlog
import uvicorn
from starlette.types import ASGIApp

log = structlog.get_logger(__name__)


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: the scheduler's own handlers decide when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True, slots=True)
class HttpTls:
    """HTTPS: the certificate and key files, and for mutual TLS the client CA."""

    cert: str
    key: str
    client_ca: str | None = None

    @classmethod
    def of(cls, cert: str | None, key: str | None, client_ca: str | None) -> HttpTls | None:
        return None if cert is None or key is None else cls(cert, key, client_ca)


class HttpServer:
    """`start()` binds (raising OSError when the port is taken) and serves; `stop()` finishes open
    responses for up to `shutdown_grace_seconds`, then closes them. With `tls`, HTTPS only."""

    def __init__(
        self, app: ASGIApp, host: str, port: int, shutdown_grace_seconds: float = 5.0, tls: HttpTls | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.scheme = "https" if tls else "http"
        config = uvicorn.Config(
            app, host=host, port=port, lifespan="off", log_config=None, access_log=False,
            timeout_graceful_shutdown=max(int(shutdown_grace_seconds), 1),
            ssl_certfile=tls.cert if tls else None, ssl_keyfile=tls.key if tls else None,
            ssl_ca_certs=tls.client_ca if tls else None,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # Binding here, not in uvicorn, turns a taken port into an OSError instead of uvicorn's sys.exit.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as error:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self.port} for the HTTP API: {error.strerror}") from error
        sock.set_inheritable(True)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http")
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.01)
        if self._task.done():
            self._task.result()
        log.info("http_listening", address=f"{self.scheme}://{self.host}:{self.port}")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        try:
            await self._task
        finally:
            self._task = None
