"""How the scheduler opens a channel to an executor: plaintext, or TLS (optionally mutual) with grpc's own
credentials. One value for the Step stream's channel and the health watch's, so both hops of one executor
are secured alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc

from shared.tls import channel_credentials

FLAG_PREFIX = "--executor-tls"


@dataclass(frozen=True, slots=True)
class ExecutorChannel:
    """`ca` None and `tls` False: plaintext. With `tls`, the executor's certificate must chain to `ca`
    (None: the system's roots) and name the host dialled, or `server_name` when given (an executor
    addressed by IP or by a DNS name its certificate does not carry). `client_cert`/`client_key` identify
    this scheduler to an executor that requires mutual TLS (its --tls-client-ca).

    The files are read once, on construction (raising ValueError naming the flag to fix); every channel
    opened shares the `credentials` built from them."""

    tls: bool = False
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None
    credentials: grpc.ChannelCredentials | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.tls:
            credentials = channel_credentials(self.ca, self.client_cert, self.client_key, FLAG_PREFIX)
            object.__setattr__(self, "credentials", credentials)

    @classmethod
    def of(cls, ca: str | None, client_cert: str | None, client_key: str | None,
           server_name: str | None) -> ExecutorChannel:
        """TLS as soon as any of the settings is given; raises ValueError naming the flag to fix."""
        tls = any(value is not None for value in (ca, client_cert, client_key, server_name))
        return cls(tls, ca, client_cert, client_key, server_name)

    def open(self, address: str, options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
        """A new channel to `address` (a HOST:PORT); the caller closes it."""
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=list(options))
        assert self.credentials is not None
        extra = [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]
        return grpc.aio.secure_channel(address, self.credentials, options=[*options, *extra])
