"""A throwaway certificate authority made with the openssl command, for the TLS tests of both hops."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> Path:
    """Writes into `directory`: ca.pem/ca.key; server.pem/server.key for 127.0.0.1 and localhost, signed
    by the CA; client.pem/client.key signed by it too; other-ca.pem and a client certificate it signed
    (other-client.*). Returns `directory`."""
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={ca}",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca, extra in (("server", "ca", ["-extfile", "san.ext"]), ("client", "ca", []),
                            ("other-client", "other-ca", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=directory)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.pem", *extra, cwd=directory)
    return directory
