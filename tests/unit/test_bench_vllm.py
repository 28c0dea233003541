"""The vLLM peer without vLLM: its settings, environment, the job and answer lines, and the process protocol
(`benchmarks/vllm_peer.py` run for real, with a stand-in `vllm` package in place of the real one, which
lives in its own environment that tests do not have)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

from benchmarks.compare import CompareConfig, _command, config_from_args
from benchmarks.system_run import VLLM_CPU, SystemRun
from benchmarks.vllm_baseline import (
    VllmEngineSettings,
    VllmEnvironment,
    VllmPeers,
    parse_run,
    peer_env_vars,
    thread_binding,
    vllm_environment,
    workload_line,
)
from benchmarks.workloads import BenchRequest

REQUESTS = [BenchRequest(3, prompt_token_ids=(7, 8)), BenchRequest(2, prompt_token_ids=(9,))]
# A stand-in for vLLM's offline API: every request's tokens are its last prompt token, max_tokens times.
# It prints to stdout, as vLLM's logger does, which must not reach the answers.
STAND_IN_VLLM = '''
import json, sys
__version__ = "0.0+stand-in"

class SamplingParams:
    def __init__(self, temperature, max_tokens, ignore_eos, detokenize):
        assert temperature == 0.0 and ignore_eos and not detokenize
        self.max_tokens = max_tokens

class _Completion:
    def __init__(self, token_ids):
        self.token_ids = token_ids

class _Output:
    def __init__(self, token_ids):
        self.outputs = [_Completion(token_ids)]

class LLM:
    def __init__(self, **kwargs):
        print("stand-in vLLM built:", json.dumps(kwargs, sort_keys=True))
        self.resets = 0

    def generate(self, prompts, params, use_tqdm):
        print("stand-in vLLM generating", len(prompts))
        if any(p.max_tokens == 13 for p in params):
            raise ValueError("stand-in failure")
        return [_Output([p["prompt_token_ids"][-1]] * s.max_tokens) for p, s in zip(prompts, params)]

    def reset_prefix_cache(self):
        self.resets += 1
        print("stand-in vLLM reset", self.resets)
        return True
'''


def args(**overrides: object) -> argparse.Namespace:
    values = dict(
        model_preset="standard", num_requests=64, seed=0, threads="1,2", overhead_sizes="1,16,64,256",
        repeat=1, peers="",
    )
    return argparse.Namespace(**{**values, **overrides})


def test_vllm_gets_pagewires_kv_bytes_in_32_token_blocks() -> None:
    assert CompareConfig().vllm_settings(Path("/m")) == VllmEngineSettings(
        model_dir="/m",
        block_size=32,
        kv_cache_bytes=2048 * 16 * (2 * 8 * 4 * 64 * 4),
        max_num_seqs=256,
        max_num_batched_tokens=2048,
        max_model_len=2048,
    )
    assert CompareConfig().vllm_settings(Path("/m")).kv_cache_bytes == 512 * 1024**2


def test_peers_flag_is_checked_and_reproduced_in_the_command() -> None:
    assert config_from_args(args()).peers == ()
    assert config_from_args(args(peers="vllm")).peers == ("vllm",)
    assert _command(args(peers="vllm")).endswith("--repeat 1 --peers vllm")
    assert _command(args()).endswith("--repeat 1")
    with pytest.raises(ValueError, match="--peers takes vllm, got sglang"):
        config_from_args(args(peers="vllm,sglang"))
    # The tiny preset's head size (16) is not one vLLM's CPU attention takes.
    with pytest.raises(ValueError, match="the tiny model's is 16"):
        config_from_args(args(peers="vllm", model_preset="tiny"))


def test_threads_bind_to_the_first_cpus_this_process_may_use() -> None:
    assert thread_binding(1, (3, 1, 2)) == "1"
    assert thread_binding(2, (3, 1, 2)) == "1,2"
    with pytest.raises(ValueError, match="vLLM can bind 1 to 2 threads here, not 3"):
        thread_binding(3, (0, 1))
    assert peer_env_vars({"HOME": "/h", "LD_PRELOAD": "old.so"}, "a.so:b.so", "0,1") == {
        "HOME": "/h",
        "LD_PRELOAD": "a.so:b.so",
        "VLLM_CPU_OMP_THREADS_BIND": "0,1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def test_environment_needs_the_venv_python_its_openmp_and_tcmalloc(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`make bench-vllm` creates .venv-vllm/bin/python"):
        vllm_environment(tmp_path / "nowhere" / "bin" / "python")
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("")
    libs = tmp_path / "libs"
    libs.mkdir()
    with pytest.raises(ValueError, match="install libtcmalloc-minimal4"):
        vllm_environment(python, [str(libs)])
    (libs / "libtcmalloc_minimal.so.4").write_text("")
    with pytest.raises(ValueError, match="venv/lib/libiomp5.so does not exist"):
        vllm_environment(python, [str(libs)])
    (tmp_path / "venv" / "lib").mkdir()
    (tmp_path / "venv" / "lib" / "libiomp5.so").write_text("")
    assert vllm_environment(python, [str(tmp_path), str(libs)]) == VllmEnvironment(
        python, f"{libs}/libtcmalloc_minimal.so.4:{tmp_path}/venv/lib/libiomp5.so"
    )


def test_job_line_and_answer_become_a_system_run() -> None:
    assert json.loads(workload_line(REQUESTS)) == {"prompts": [[7, 8], [9]], "max_tokens": [3, 2]}
    answer = {"duration_s": 0.5, "outputs": [[1, 2, 3], [4, 5]]}
    assert parse_run(answer, REQUESTS, "A", 2) == SystemRun(
        VLLM_CPU, "A", 2, 0.5, 3, 5, ((1, 2, 3), (4, 5))
    )
    with pytest.raises(RuntimeError, match="vLLM answered 1 of 2 requests of workload B"):
        parse_run({"duration_s": 0.5, "outputs": [[1, 2, 3]]}, REQUESTS, "B", 1)
    with pytest.raises(RuntimeError, match=r"other than max_tokens tokens for requests \[1\] of workload A"):
        parse_run({"duration_s": 0.5, "outputs": [[1, 2, 3], [4]]}, REQUESTS, "A", 1)
    with pytest.raises(ValueError, match="token-id prompts only"):
        workload_line([BenchRequest(2, prompt_text="text")])


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> VllmEnvironment:
    package = tmp_path / "stand_in" / "vllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STAND_IN_VLLM)
    monkeypatch.setenv("PYTHONPATH", str(package.parent))
    return VllmEnvironment(Path(sys.executable), "")


def test_peer_process_answers_each_workload_and_keeps_logs_out_of_the_answers(
    stand_in: VllmEnvironment, tmp_path: Path
) -> None:
    settings = CompareConfig().vllm_settings(tmp_path / "model")
    peers = VllmPeers(stand_in, settings, tmp_path / "logs")
    try:
        first = peers.run(REQUESTS, "A", 1)
        again = peers.run(REQUESTS, "B", 1)
        assert list(peers.peers) == [1]
    finally:
        peers.close()
    assert (first.system, first.workload, first.num_threads, first.outputs) == (
        VLLM_CPU, "A", 1, ((8, 8, 8), (9, 9)),
    )
    assert (again.workload, again.num_output_tokens, again.outputs) == ("B", 5, first.outputs)
    assert peers.peers == {} and peers.version == "0.0+stand-in" and list(peers.startup_s) == [1]
    log = (tmp_path / "logs" / "vllm-1-threads.log").read_text()
    built = json.loads(log.split("stand-in vLLM built: ", 1)[1].splitlines()[0])
    assert built == {
        "block_size": 32,
        "dtype": "float32",
        "enable_prefix_caching": True,
        "kv_cache_memory_bytes": 512 * 1024**2,
        "max_model_len": 2048,
        "max_num_batched_tokens": 2048,
        "max_num_seqs": 256,
        "model": str(tmp_path / "model"),
        "seed": 0,
        "skip_tokenizer_init": True,
    }
    # A warm-up request, then the reset, before each timed run.
    assert log.count("stand-in vLLM generating 1\n") == 2 and "stand-in vLLM reset 2\n" in log
    assert peers.describe() == {
        "version": "0.0+stand-in",
        "startup_s_by_threads": {"1": round(peers.startup_s[1], 1)},
        "settings": {
            "block_size": 32,
            "kv_cache_bytes": 512 * 1024**2,
            "max_num_seqs": 256,
            "max_num_batched_tokens": 2048,
            "max_model_len": 2048,
        },
    }


def test_peer_that_fails_is_reported_with_its_log(stand_in: VllmEnvironment, tmp_path: Path) -> None:
    peers = VllmPeers(stand_in, CompareConfig().vllm_settings(tmp_path), tmp_path / "logs")
    try:
        with pytest.raises(RuntimeError, match="(?s)vLLM exited with 1.*ValueError: stand-in failure"):
            peers.run([BenchRequest(13, prompt_token_ids=(1,))], "A", 2)
    finally:
        peers.close()
    assert peers.peers == {}
