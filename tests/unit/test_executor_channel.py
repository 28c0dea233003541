"""ExecutorChannel: plaintext unless an --executor-tls-* flag is given, files checked at start-up with
the flag named."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from scheduler_service.executor_channel import ExecutorChannel


def test_no_flag_is_plaintext() -> None:
    assert ExecutorChannel.of(None, None, None, None) == ExecutorChannel(tls=False)


def test_a_server_name_alone_means_tls_with_the_system_roots() -> None:
    channel = ExecutorChannel.of(None, None, None, "executor.internal")
    assert channel.tls and channel.ca is None and channel.server_name == "executor.internal"


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (("missing.pem", None, None), "--executor-tls-ca .*missing.pem: cannot read the CA certificate"),
        (("not-pem.txt", None, None), "--executor-tls-ca .*not-pem.txt: not a PEM file"),
        ((None, "cert.pem", None), "--executor-tls-client-cert and --executor-tls-client-key go together"),
    ],
)
def test_bad_files_are_refused_at_start_up_naming_the_flag(
    tmp_path: Path, files: tuple[str | None, ...], message: str
) -> None:
    (tmp_path / "not-pem.txt").write_text("hello")
    (tmp_path / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    ca, cert, key = (None if name is None else str(tmp_path / name) for name in files)
    with pytest.raises(ValueError, match=message):
        ExecutorChannel.of(ca, cert, key, None)


def test_the_files_are_read_once_on_construction_and_every_channel_shares_them(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = ExecutorChannel.of(str(ca), None, None, None)
    credentials = settings.credentials
    ca.unlink()  # a channel opened now would fail if it read the file again

    async def open_two() -> None:
        for address in ("127.0.0.1:1", "127.0.0.1:2"):
            await settings.open(address).close()

    asyncio.run(open_two())
    assert credentials is not None and settings.credentials is credentials
