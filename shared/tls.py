"""TLS with grpc's own credentials, for both hops: a server's certificate and key, and for mutual TLS the
CA whose client certificates it accepts; a client's trusted CA and optional certificate.

`prefix` is the flag family an error names: `--tls` for the public API (`--tls-cert`, `--tls-ca`, ...) and
the executor's own server, `--executor-tls` for the scheduler's side of the executor hop
(`--executor-tls-ca`, `--executor-tls-client-cert`, ...)."""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: str, what: str, flag: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot read the {what}: {error.strerror}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (the {what} must be PEM-encoded)")
    return data


def check_server_files(cert: str | None, key: str | None, client_ca: str | None, prefix: str = "--tls") -> None:
    """Raises ValueError naming the flag when the combination or a file is wrong."""
    if (cert is None) != (key is None):
        raise ValueError(f"{prefix}-cert and {prefix}-key go together: give both or neither")
    if client_ca is not None and cert is None:
        raise ValueError(f"{prefix}-client-ca (mutual TLS) needs {prefix}-cert and {prefix}-key")
    if cert is not None and key is not None:
        _read(cert, "certificate", f"{prefix}-cert")
        _read(key, "private key", f"{prefix}-key")
    if client_ca is not None:
        _read(client_ca, "client CA certificate", f"{prefix}-client-ca")


def server_credentials(cert: str, key: str, client_ca: str | None, prefix: str = "--tls") -> grpc.ServerCredentials:
    """With `client_ca`, every client must present a certificate that CA signed."""
    return grpc.ssl_server_credentials(
        [(_read(key, "private key", f"{prefix}-key"), _read(cert, "certificate", f"{prefix}-cert"))],
        root_certificates=None if client_ca is None else _read(client_ca, "client CA certificate", f"{prefix}-client-ca"),
        require_client_auth=client_ca is not None,
    )


def channel_credentials(ca: str | None, cert: str | None = None, key: str | None = None,
                        prefix: str = "--tls") -> grpc.ChannelCredentials:
    """Trusts `ca` (None: the system's roots); `cert` and `key` identify the client for mutual TLS."""
    if (cert is None) != (key is None):
        raise ValueError(f"{prefix}-client-cert and {prefix}-client-key go together")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else _read(ca, "CA certificate", f"{prefix}-ca"),
        private_key=None if key is None else _read(key, "client private key", f"{prefix}-client-key"),
        certificate_chain=None if cert is None else _read(cert, "client certificate", f"{prefix}-client-cert"),
    )
