"""Multi-LoRA serving end to end, real processes: a mixed concurrent batch of the base model and more
adapters than LoRA slots, with chunked prefill, preemption and the prefix cache, equals PEFT token for
token; adapters load and unload at runtime over gRPC and HTTP; every bad input gets its status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest

from executor_service.tiny_model import create_tiny_model
from shared.pb.pagewire.v1 import generate_pb2 as pb
from shared.pb.pagewire.v1 import generate_pb2_grpc as pb_grpc
from tests.helpers.peft_adapters import make_peft_adapter, peft_greedy
from tests.helpers.processes import free_port, running_server

MAX_TOKENS = 8


@dataclass(frozen=True)
class AdapterCase:
    name: str
    rank: int
    targets: tuple[str, ...]
    use_rslora: bool = False
    safe_serialization: bool = True


CASES = (
    AdapterCase("a", 8, ("q_proj", "v_proj")),
    AdapterCase("b", 4, ("o_proj", "down_proj"), use_rslora=True),
    AdapterCase("c", 16, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
    AdapterCase("d", 2, ("gate_proj", "up_proj"), safe_serialization=False),
    AdapterCase("e", 6, ("k_proj", "down_proj")),
)
PROMPTS = {
    "": tuple(range(3, 27)),  # 24 tokens: two chunks of 16 and 8 at --max-num-batched-tokens 16
    # a, c and e cross a block boundary while decoding: with a small pool some get preempted.
    "a": tuple(range(40, 52)),
    "b": (7, 9, 11, 13, 15, 17, 19),
    "c": tuple(range(100, 114)),
    "d": (250, 3, 250, 3, 8),
    "e": tuple(range(60, 73)),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("lora") / "tiny", seed=5)


@pytest.fixture(scope="module")
def adapter_dirs(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        case.name: make_peft_adapter(
            base, root / case.name, rank=case.rank, target_modules=case.targets, lora_alpha=2 * case.rank,
            use_rslora=case.use_rslora, seed=ord(case.name), safe_serialization=case.safe_serialization,
        )
        for case in CASES
    }


@pytest.fixture(scope="module")
def expected(base: Path, adapter_dirs: dict[str, Path]) -> dict[str, list[int]]:
    """PEFT's greedy tokens for each adapter's prompt ("" = the base model); each adapter changes them."""
    tokens = {
        name: peft_greedy(base, adapter_dirs.get(name), prompt, MAX_TOKENS) for name, prompt in PROMPTS.items()
    }
    for name, prompt in PROMPTS.items():
        if name:
            assert peft_greedy(base, None, prompt, MAX_TOKENS) != tokens[name], f"adapter {name} changes nothing"
    return tokens


def serve(base: Path, adapter_dirs: dict[str, Path], *extra_executor: str, http_port: int = 0,
          extra_scheduler: tuple[str, ...] = ()):
    return running_server(
        base,
        executor_args=("--enable-lora", "--max-loras", "2", "--max-lora-rank", "16", *extra_executor),
        scheduler_args=(
            "--enable-lora", "--lora-modules", f"a={adapter_dirs['a']}", f"b={adapter_dirs['b']}",
            "--max-num-batched-tokens", "16", "--max-num-seqs", "8", "--http-port", str(http_port),
            *extra_scheduler,
        ),
    )


@pytest.fixture(scope="module")
def server(base: Path, adapter_dirs: dict[str, Path]) -> Iterator[tuple[str, str]]:
    port = free_port()
    with serve(base, adapter_dirs, http_port=port) as address:
        yield address, f"http://127.0.0.1:{port}"


def stub_of(address: str) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(grpc.insecure_channel(address))


def generate(address: str, prompt: tuple[int, ...], adapter: str = "", max_tokens: int = MAX_TOKENS) -> pb.GenerateResponse:
    """The request's tokens (all messages joined) and the final message's usage, as one response."""
    message = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=list(prompt)), adapter=adapter,
        sampling=pb.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )
    joined = pb.GenerateResponse()
    for response in stub_of(address).Generate(message, timeout=120):
        joined.token_ids.extend(response.token_ids)
        joined.text += response.text
        joined.usage.CopyFrom(response.usage)
    return joined


def load(address: str, name: str, path: Path | str) -> pb.AdapterInfo:
    return stub_of(address).LoadAdapter(pb.LoadAdapterRequest(name=name, path=str(path)), timeout=30)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def wait_idle(address: str) -> pb.ServerInfo:
    import time

    deadline = time.monotonic() + 30
    while True:
        info = stub_of(address).GetServerInfo(pb.GetServerInfoRequest(), timeout=5)
        if info.num_running == 0 and info.num_waiting == 0 and info.num_free_device_blocks == info.num_device_blocks:
            return info
        assert time.monotonic() < deadline, f"blocks still held: {info}"
        time.sleep(0.1)


def post(url: str, body: dict) -> tuple[int, str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_a_mixed_concurrent_batch_over_two_slots_equals_peft(
    server: tuple[str, str], adapter_dirs: dict[str, Path], expected: dict[str, list[int]]
) -> None:
    address = server[0]
    for case in CASES[2:]:
        load(address, case.name, adapter_dirs[case.name])
    names = list(PROMPTS) * 2  # 12 requests, 5 adapters and the base, over 2 slots
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda name: generate(address, PROMPTS[name], name), names))
    for name, result in zip(names, results, strict=True):
        assert list(result.token_ids) == expected[name], f"adapter {name!r}"
    wait_idle(address)


def test_adapters_are_listed_with_what_their_files_say(server: tuple[str, str], adapter_dirs: dict[str, Path]) -> None:
    listed = {a.name: a for a in stub_of(server[0]).ListAdapters(pb.ListAdaptersRequest(), timeout=5).adapters}
    assert {"a", "b"} <= set(listed)
    assert (listed["a"].rank, list(listed["a"].target_modules), listed["a"].scaling) == (8, ["q_proj", "v_proj"], 2.0)
    assert listed["b"].rank == 4 and listed["b"].scaling == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(r)
    assert listed["a"].path == str(adapter_dirs["a"].resolve()) and listed["a"].num_requests == 0


def test_two_adapters_share_no_cached_blocks_and_one_adapter_does(server: tuple[str, str]) -> None:
    address = server[0]
    prompt = tuple(range(130, 163))  # two full blocks of 16 and one token (the last is always computed)
    first = generate(address, prompt, "a", max_tokens=2)
    assert first.usage.cached_prompt_tokens == 0
    assert generate(address, prompt, "b", max_tokens=2).usage.cached_prompt_tokens == 0
    assert generate(address, prompt, "", max_tokens=2).usage.cached_prompt_tokens == 0
    assert generate(address, prompt, "a", max_tokens=2).usage.cached_prompt_tokens == 32
    wait_idle(address)


def test_runtime_load_and_unload_over_grpc(server: tuple[str, str], adapter_dirs: dict[str, Path],
                                           expected: dict[str, list[int]]) -> None:
    address = server[0]
    info = load(address, "late", adapter_dirs["e"])
    assert (info.name, info.rank) == ("late", 6)
    assert load(address, "late", adapter_dirs["e"]) == info  # the same name and path again: a no-op
    assert list(generate(address, PROMPTS["e"], "late").token_ids) == expected["e"]
    error = rpc_error(lambda: load(address, "late", adapter_dirs["a"]))
    assert error.code() is grpc.StatusCode.ALREADY_EXISTS and "already loaded from" in error.details()
    stub_of(address).UnloadAdapter(pb.UnloadAdapterRequest(name="late"), timeout=5)
    error = rpc_error(lambda: generate(address, PROMPTS["e"], "late"))
    assert error.code() is grpc.StatusCode.NOT_FOUND and "unknown adapter 'late'" in error.details()
    error = rpc_error(lambda: stub_of(address).UnloadAdapter(pb.UnloadAdapterRequest(name="late"), timeout=5))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    # The name is free again, for other files.
    assert load(address, "late", adapter_dirs["a"]).rank == 8
    assert list(generate(address, PROMPTS["a"], "late").token_ids) == expected["a"]
    wait_idle(address)


def test_unloading_an_adapter_in_use_lets_its_requests_finish(server: tuple[str, str], adapter_dirs: dict[str, Path]) -> None:
    address = server[0]
    load(address, "busy", adapter_dirs["c"])
    long = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5, 6, 7]), adapter="busy",
                              sampling=pb.SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
    stream = stub_of(address).Generate(long, timeout=120)
    first = next(stream)
    stub_of(address).UnloadAdapter(pb.UnloadAdapterRequest(name="busy"), timeout=5)
    rest = list(stream)
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 64
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
    wait_idle(address)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/etc/passwd", "'/etc/passwd' is not a directory"),
        ("/nonexistent", "is not a directory"),
        ("", "give the adapter's directory"),
    ],
)
def test_a_bad_adapter_path_is_invalid_and_the_server_keeps_serving(
    server: tuple[str, str], path: str, message: str
) -> None:
    error = rpc_error(lambda: load(server[0], "bad", path))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and message in error.details()
    assert len(generate(server[0], (1, 2, 3), "a", max_tokens=2).token_ids) == 2


def test_an_adapter_of_too_high_rank_is_refused(server: tuple[str, str], base: Path, tmp_path: Path) -> None:
    big = make_peft_adapter(base, tmp_path / "big", rank=32, target_modules=["q_proj"], lora_alpha=32)
    error = rpc_error(lambda: load(server[0], "big", big))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT and "exceeds --max-lora-rank 16" in error.details()


def test_the_openai_client_selects_an_adapter_by_model(
    server: tuple[str, str], adapter_dirs: dict[str, Path], expected: dict[str, list[int]], base: Path
) -> None:
    url = server[1]
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    ids = [m.id for m in client.models.list().data]
    assert ids[0] == base.name and {"a", "b"} <= set(ids[1:])
    by_grpc = {model: generate(server[0], PROMPTS["b"], adapter) for model, adapter in (("b", "b"), (base.name, ""))}
    assert list(by_grpc["b"].token_ids) == expected["b"]
    assert by_grpc["b"].text != by_grpc[base.name].text
    for model, reference in by_grpc.items():
        completion = client.completions.create(model=model, prompt=list(PROMPTS["b"]), max_tokens=MAX_TOKENS,
                                               temperature=0.0, extra_body={"ignore_eos": True})
        assert completion.model == model and completion.choices[0].text == reference.text
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="zzz", prompt="hi", max_tokens=2)


def test_http_load_and_unload_endpoints(server: tuple[str, str], adapter_dirs: dict[str, Path]) -> None:
    url = server[1] + "/v1"
    assert post(url + "/load_lora_adapter", {"lora_name": "web", "lora_path": str(adapter_dirs["d"])}) == (
        200, "Success: LoRA adapter 'web' added successfully.")
    status, body = post(url + "/load_lora_adapter", {"lora_name": "web", "lora_path": str(adapter_dirs["a"])})
    assert status == 400 and "already loaded" in body
    status, body = post(url + "/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc/passwd"})
    assert status == 400 and "is not a directory" in body
    assert post(url + "/unload_lora_adapter", {"lora_name": "web"})[0] == 200
    status, body = post(url + "/unload_lora_adapter", {"lora_name": "web"})
    assert status == 404 and "unknown adapter 'web'" in body


# Eight 12-token prompts, 24 tokens each: 3 blocks per request, 24 for all, in a pool of 5.
PRESSURE = [(("a", "c", "")[i % 3], tuple(range(10 * i + 3, 10 * i + 15))) for i in range(8)]
PRESSURE_MAX_TOKENS = 24


@pytest.fixture(scope="module")
def pressure_expected(base: Path, adapter_dirs: dict[str, Path]) -> list[list[int]]:
    return [peft_greedy(base, adapter_dirs.get(name), prompt, PRESSURE_MAX_TOKENS) for name, prompt in PRESSURE]


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_with_adapters_equals_peft(
    base: Path, adapter_dirs: dict[str, Path], pressure_expected: list[list[int]], mode: str
) -> None:
    """A KV pool of 5 blocks of 16 tokens for 8 concurrent requests of 3 blocks each: requests are
    preempted, give their LoRA slot back, and resume with their adapter."""
    with serve(base, adapter_dirs, "--num-gpu-blocks-override", "5",
               extra_scheduler=("--preemption-mode", mode, "--max-model-len", "64")) as address:
        load(address, "c", adapter_dirs["c"])
        with ThreadPoolExecutor(len(PRESSURE)) as pool:
            results = list(pool.map(
                lambda case: generate(address, case[1], case[0], max_tokens=PRESSURE_MAX_TOKENS), PRESSURE
            ))
        for (name, _), result, reference in zip(PRESSURE, results, pressure_expected, strict=True):
            assert list(result.token_ids) == reference, f"adapter {name!r}"
        info = wait_idle(address)
        assert info.num_preemptions > 0
        assert (info.num_preemptions_swap > 0) == (mode == "swap")


def test_lora_off_refuses_loading_with_failed_precondition(base: Path, adapter_dirs: dict[str, Path]) -> None:
    with running_server(base) as address:
        error = rpc_error(lambda: load(address, "a", adapter_dirs["a"]))
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION and "--enable-lora" in error.details()
        error = rpc_error(lambda: generate(address, (1, 2), "a"))
        assert error.code() is grpc.StatusCode.NOT_FOUND


def test_an_adapter_whose_files_break_after_loading_fails_its_requests_only(
    server: tuple[str, str], adapter_dirs: dict[str, Path], expected: dict[str, list[int]], tmp_path: Path
) -> None:
    """The scheduler checked the files at LoadAdapter; they are truncated before the executor first reads
    them: that request fails INVALID_ARGUMENT, the adapter is unloaded, everything else goes on."""
    import shutil

    address = server[0]
    fragile = tmp_path / "fragile"
    shutil.copytree(adapter_dirs["e"], fragile)
    load(address, "fragile", fragile)
    weights = fragile / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    error = rpc_error(lambda: generate(address, PROMPTS["e"], "fragile"))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'fragile' can no longer be read" in error.details() and "was unloaded" in error.details()
    listed = [a.name for a in stub_of(address).ListAdapters(pb.ListAdaptersRequest(), timeout=5).adapters]
    assert "fragile" not in listed
    assert list(generate(address, PROMPTS["a"], "a").token_ids) == expected["a"]
    assert list(generate(address, PROMPTS[""], "").token_ids) == expected[""]
    wait_idle(address)


def test_metrics_report_lora_slots_and_loads(server: tuple[str, str]) -> None:
    generate(server[0], (1, 2, 3), "a", max_tokens=2)
    wait_idle(server[0])
    with urllib.request.urlopen(server[1] + "/metrics", timeout=10) as response:
        text = response.read().decode()
    info = [line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{")]
    assert len(info) == 1 and 'max_lora="2"' in info[0]
    assert 'running_lora_adapters=""' in info[0] and 'waiting_lora_adapters=""' in info[0]
    loads = [line for line in text.splitlines() if line.startswith("pagewire:lora_slot_loads_total")]
    assert len(loads) == 1 and float(loads[0].split()[-1]) >= 1


def test_pagewire_generate_answers_with_an_adapter(server: tuple[str, str]) -> None:
    import subprocess
    import sys

    from tests.helpers.processes import REPO_ROOT

    def cli(*adapter: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "pagewire", "generate", "--address", server[0], "--no-chat", "--max-tokens", "8",
             "--ignore-eos", *adapter, "hello there"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    message = pb.GenerateRequest(text="hello there", adapter="b",
                                 sampling=pb.SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    by_grpc = "".join(r.text for r in stub_of(server[0]).Generate(message, timeout=60))
    assert cli("--adapter", "b") == by_grpc + "\n"
    assert cli() != cli("--adapter", "b")
