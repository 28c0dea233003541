"""TLS on the public hop with certificates made here by openssl: gRPC and HTTPS need TLS once the
server has --tls-cert/--tls-key, and with --tls-client-ca only clients with a certificate that CA
signed get in; `pagewire generate --tls-ca` connects."""

from __future__ import annotations

import contextlib
import http.client
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from executor_service.tiny_model import create_tiny_model
from shared.child_process import stop_child
from shared.tls import channel_credentials
from tests.helpers.pki import make_pki
from tests.helpers.processes import REPO_ROOT, free_port, running_executor

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def executor_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = create_tiny_model(tmp_path_factory.mktemp("tls") / "tiny", seed=0)
    with running_executor(model) as address:
        yield address


@contextlib.contextmanager
def tls_scheduler(executor_address: str, *tls_args: str) -> Iterator[tuple[str, str]]:
    port, http_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "pagewire", "scheduler", "--executor", executor_address, "--port", str(port),
         "--http-port", str(http_port), *tls_args],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield f"127.0.0.1:{port}", f"https://127.0.0.1:{http_port}"
    finally:
        stop_child(process)


def serving(address: str, credentials: grpc.ChannelCredentials | None, timeout: float = 60) -> int | None:
    """The Generation service's health over the given channel, waited for; None if never reachable."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
        with channel:
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="pagewire.v1.Generation"), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return status
            except grpc.RpcError:
                pass
        time.sleep(0.3)
    return None


def https_status(url: str, context: ssl.SSLContext) -> int:
    try:
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_tls_on_grpc_and_https_and_the_generate_client(executor_address: str, pki: Path) -> None:
    with tls_scheduler(executor_address, "--tls-cert", str(pki / "server.pem"), "--tls-key",
                       str(pki / "server.key")) as (address, url):
        trusted = channel_credentials(str(pki / "ca.pem"))
        assert serving(address, trusted) is not None
        assert serving(address, None, timeout=3) is None  # plaintext gets nowhere
        assert serving(address, channel_credentials(str(pki / "other-ca.pem")), timeout=3) is None
        assert https_status(url + "/health", ssl.create_default_context(cafile=str(pki / "ca.pem"))) == 200
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
            urllib.request.urlopen(url.replace("https", "http") + "/health", timeout=5)
        done = subprocess.run(
            [sys.executable, "-m", "pagewire", "generate", "--address", address, "--tls-ca", str(pki / "ca.pem"),
             "--no-chat", "--max-tokens", "4", "--ignore-eos", "hi"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr


def test_mutual_tls_admits_only_clients_the_ca_signed(executor_address: str, pki: Path) -> None:
    with tls_scheduler(executor_address, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                       "--tls-client-ca", str(pki / "ca.pem")) as (address, url):
        ca = str(pki / "ca.pem")
        client = channel_credentials(ca, str(pki / "client.pem"), str(pki / "client.key"))
        assert serving(address, client) is not None
        assert serving(address, channel_credentials(ca), timeout=3) is None
        stranger = channel_credentials(ca, str(pki / "other-client.pem"), str(pki / "other-client.key"))
        assert serving(address, stranger, timeout=3) is None
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(str(pki / "client.pem"), str(pki / "client.key"))
        assert https_status(url + "/health", context) == 200
        with pytest.raises((ssl.SSLError, urllib.error.URLError, http.client.HTTPException, ConnectionError)):
            https_status(url + "/health", ssl.create_default_context(cafile=ca))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tls-cert", "{pki}/server.pem"), "--tls-cert and --tls-key go together"),
        (("--tls-cert", "{pki}/missing.pem", "--tls-key", "{pki}/server.key"), "cannot read the certificate"),
        (("--tls-cert", "{pki}/san.ext", "--tls-key", "{pki}/server.key"), "not a PEM file"),
        (("--tls-client-ca", "{pki}/ca.pem"), "needs --tls-cert and --tls-key"),
    ],
)
def test_bad_tls_settings_exit_2_naming_the_flag(pki: Path, args: tuple[str, ...], message: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pagewire", "scheduler", "--executor", "127.0.0.1:1", "--http-port", "0",
         *(a.format(pki=pki) for a in args)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_serving_benchmark_connects_with_mutual_tls_and_an_api_key(executor_address: str, pki: Path) -> None:
    with tls_scheduler(executor_address, "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key"),
                       "--tls-client-ca", str(pki / "ca.pem"), "--api-key", "bench-key") as (address, _):
        client = ["--tls-ca", str(pki / "ca.pem"), "--tls-client-cert", str(pki / "client.pem"),
                  "--tls-client-key", str(pki / "client.key")]
        bench = [sys.executable, "-m", "pagewire", "bench", "serve", "--address", address, "--num-prompts", "3",
                 "--input-len", "4", "--output-len", "2", "--no-progress", "--timeout", "60", *client]
        done = subprocess.run([*bench, "--api-key", "bench-key"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr
        assert "Successful requests:" in done.stdout and " 3" in done.stdout
        refused = subprocess.run([*bench, "--api-key", "wrong"], cwd=REPO_ROOT, capture_output=True, text=True,
                                 timeout=180)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "refused this client" in refused.stderr
