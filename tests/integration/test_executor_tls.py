"""TLS on the scheduler -> executor hop, with certificates made here by openssl: an executor with
--tls-cert/--tls-key/--tls-client-ca serves only schedulers that trust its CA and present a certificate
that CA signed (--executor-tls-ca, --executor-tls-client-cert/-key), on top of its executor token."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import executor_pb2, executor_pb2_grpc
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from shared.tls import channel_credentials
from tests.helpers.pki import make_pki
from tests.helpers.processes import (
    REPO_ROOT,
    cpu_executor_args,
    free_port,
    health_status,
    running,
    running_scheduler,
    wait_health,
)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")

GENERATION = "pagewire.v1.Generation"
TOKEN = "executor-tls-test-token"
# A scheduler that cannot complete the handshake must still be NOT_SERVING after this long; a good one
# turns SERVING within a second or two of its start on this machine.
REFUSED_FOR_SECONDS = 6.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def executor_address(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[str]:
    """A mutual-TLS executor with a token."""
    model = create_tiny_model(tmp_path_factory.mktemp("tls") / "tiny", seed=0)
    port = free_port()
    args = cpu_executor_args(model, port, "--executor-token", TOKEN, "--tls-cert", str(pki / "server.pem"),
                             "--tls-key", str(pki / "server.key"), "--tls-client-ca", str(pki / "ca.pem"))
    credentials = channel_credentials(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    with running(args, f"127.0.0.1:{port}", credentials=credentials):
        yield f"127.0.0.1:{port}"


def tls_args(pki: Path, client: str | None = "client", ca: str = "ca") -> list[str]:
    args = ["--executor-token", TOKEN, "--executor-tls-ca", str(pki / f"{ca}.pem")]
    if client is not None:
        args += ["--executor-tls-client-cert", str(pki / f"{client}.pem"),
                 "--executor-tls-client-key", str(pki / f"{client}.key")]
    return args


def generate(address: str) -> list[int]:
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(range(5, 25))),
                                 sampling=pb.SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    with grpc.insecure_channel(address) as channel:
        return [t for r in pb_grpc.GenerationStub(channel).Generate(request, timeout=60) for t in r.token_ids]


def assert_never_ready(address: str) -> None:
    deadline = time.monotonic() + REFUSED_FOR_SECONDS
    while time.monotonic() < deadline:
        assert health_status(address, GENERATION) == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(0.5)


def test_a_scheduler_with_the_ca_and_a_client_certificate_is_served(executor_address: str, pki: Path) -> None:
    with running_scheduler(executor_address, *tls_args(pki)) as address:
        wait_health(address, GENERATION, health_pb2.HealthCheckResponse.SERVING, timeout=60)
        assert len(generate(address)) == 5


@pytest.mark.parametrize(
    "refused",
    [
        pytest.param([], id="plaintext-with-the-token"),
        pytest.param(["no-client-certificate"], id="tls-without-a-client-certificate"),
        pytest.param(["foreign-client-certificate"], id="a-client-certificate-another-ca-signed"),
        pytest.param(["untrusted-server"], id="trusting-another-ca"),
    ],
)
def test_a_scheduler_without_the_right_credentials_never_gets_ready(
    executor_address: str, pki: Path, refused: list[str]
) -> None:
    if not refused:
        args = ["--executor-token", TOKEN]
    elif refused == ["no-client-certificate"]:
        args = tls_args(pki, client=None)
    elif refused == ["foreign-client-certificate"]:
        args = tls_args(pki, client="other-client")
    else:
        args = tls_args(pki, ca="other-ca")
    with running_scheduler(executor_address, *args) as address:
        assert_never_ready(address)


def test_plaintext_describe_on_the_tls_port_is_refused(executor_address: str) -> None:
    with grpc.insecure_channel(executor_address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            executor_pb2_grpc.ExecutorStub(channel).Describe(
                executor_pb2.DescribeRequest(), timeout=5, metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("scheduler", ["--executor-tls-client-cert", "{pki}/client.pem"],
         "--executor-tls-client-cert and --executor-tls-client-key go together"),
        ("scheduler", ["--executor-tls-ca", "{pki}/missing.pem"], "--executor-tls-ca"),
        ("scheduler", ["--executor-tls-ca", "{pki}/san.ext"], "not a PEM file"),
        ("executor", ["--tls-cert", "{pki}/server.pem"], "--tls-cert and --tls-key go together"),
        ("executor", ["--tls-client-ca", "{pki}/ca.pem"], "needs --tls-cert and --tls-key"),
    ],
)
def test_bad_tls_settings_exit_2_naming_the_flag(pki: Path, command: str, args: list[str], message: str) -> None:
    base = (["scheduler", "--executor", "127.0.0.1:1", "--port", "0", "--http-port", "0"] if command == "scheduler"
            else ["executor", "--model", str(pki), "--device", "cpu"])
    done = subprocess.run([sys.executable, "-m", "pagewire", *base, *(a.format(pki=pki) for a in args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
