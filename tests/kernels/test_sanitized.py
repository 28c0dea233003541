"""The emulated kernels again under sanitizers: inside their tensors, aligned, and free of races in a CTA.

On a GPU an access past a tensor is an illegal-address fault (or silent corruption), a misaligned
vector access a misaligned-address fault, and a missing barrier a race that may go unseen for months.
The emulator builds the kernels with a sanitizer (`PAGEWIRE_EMULATOR_SANITIZER`, see host_library.py)
and runs them in a child Python with the sanitizer's runtime preloaded, so a finding aborts the child
with a report naming the kernel line:
- `address`: AddressSanitizer and the alignment check;
- `thread`: ThreadSanitizer with one fiber per CUDA thread, synchronised only at barriers and shuffles
  (the plain emulator runs threads in order between barriers, which hides a missing barrier).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cuda_emulator.host_library import COMPILER, compiler_available

REPO = Path(__file__).resolve().parents[2]
RUNTIMES = {"address": "libasan.so", "thread": "libtsan.so"}
OPTIONS = {
    # Python and torch allocate for good at exit; only bad accesses matter here.
    "address": {"ASAN_OPTIONS": "detect_leaks=0", "UBSAN_OPTIONS": "print_stacktrace=1"},
    # torch's own thread pool is not instrumented and would look racy: one thread.
    "thread": {"TSAN_OPTIONS": "halt_on_error=1", "OMP_NUM_THREADS": "1"},
}


def sanitizer_runtime(sanitizer: str) -> str | None:
    """The path of the compiler's runtime for `sanitizer`, or None."""
    if not compiler_available():
        return None
    completed = subprocess.run(
        [COMPILER, f"-print-file-name={RUNTIMES[sanitizer]}"], capture_output=True, text=True, check=False
    )
    path = completed.stdout.strip()
    return path if completed.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


def run_sanitized(sanitizer: str, arguments: list[str], timeout_s: int) -> subprocess.CompletedProcess[str]:
    runtime = sanitizer_runtime(sanitizer)
    if runtime is None:
        pytest.skip(f"needs {COMPILER} with its {sanitizer} sanitizer runtime")
    env = dict(os.environ)
    env.update(
        PAGEWIRE_EMULATOR_SANITIZER=sanitizer, LD_PRELOAD=runtime, PYTHONPATH=str(REPO), **OPTIONS[sanitizer]
    )
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


# sanitizer, what its report says, kernel source, block. Each kernel gets `float* data` of 32 floats.
FAULTY_KERNELS = {
    "one_past_the_end": (
        "address",
        "AddressSanitizer: heap-buffer-overflow",
        "__global__ void faulty_kernel(float* data) { data[threadIdx.x] = 1.0f; }",
        (33, 1, 1),
    ),
    "misaligned_vector_load": (
        "address",
        "misaligned address",
        "__global__ void faulty_kernel(float* data) { "
        + "data[0] = __uint_as_float(reinterpret_cast<const uint4*>(data + 1)->x); }",
        (1, 1, 1),
    ),
    "missing_barrier": (
        "thread",
        "ThreadSanitizer: data race",
        "__global__ void faulty_kernel(float* data) { __shared__ float slots[32]; "
        + "slots[threadIdx.x] = threadIdx.x; data[threadIdx.x] = slots[(threadIdx.x + 1) % 32]; }",
        (32, 1, 1),
    ),
}
DRIVER = """
import numpy as np, torch
from tests.helpers.cuda_emulator.host_library import HostKernelLibrary, host_source_of
library = HostKernelLibrary(host_source_of('#include "common.cuh"\\n' + {source!r}), ("faulty_kernel",))
data = torch.zeros(32)
library.launch("faulty_kernel", (1, 1, 1), {block!r}, (np.uint64(data.data_ptr()),))
"""


@pytest.mark.parametrize("fault", sorted(FAULTY_KERNELS))
def test_the_sanitizers_catch_what_a_gpu_would_fault_or_race_on(fault):
    sanitizer, report, source, block = FAULTY_KERNELS[fault]
    completed = run_sanitized(sanitizer, ["-c", DRIVER.format(source=source, block=block)], timeout_s=300)
    assert completed.returncode != 0
    assert report in completed.stderr, completed.stderr[-3000:]
    assert "faulty_kernel" in completed.stderr


KERNEL_TESTS = [
    "tests/kernels/test_cuda_attention.py",
    "tests/kernels/test_cuda_cache_ops.py",
    "tests/kernels/test_cuda_sgmv.py",
]
# ThreadSanitizer costs about 50x: one attention case per path (several tiles with GQA, one tile with
# GQA 8, the split launch and its reduction), every cache op, and SGMV on the small shape.
RACE_SELECTION = (
    "emulated and (fp32-16-16-ratio4-prefill_chunks_mixed or bf16-8-128-ratio8-single_token"
    " or (split_and_unsplit and emulated-1]) or test_write_kv or test_copy_blocks or test_swap"
    " or 1000-8-536-8-bf16)"
)
SUITES = {
    # make test's share of the matrix: about 2.5 minutes, plus 3 for the sanitized builds.
    "address": ["-m", "not slow", "-k", "emulated"],
    # 22 tests: about 3 minutes.
    "thread": ["-s", "-k", RACE_SELECTION],
}


@pytest.mark.slow
@pytest.mark.parametrize("sanitizer", sorted(SUITES))
def test_the_emulated_kernel_suite_under_a_sanitizer(sanitizer):
    completed = run_sanitized(
        sanitizer, ["-m", "pytest", "-q", "-p", "no:cacheprovider", *SUITES[sanitizer], *KERNEL_TESTS], 1800
    )
    report = completed.stdout[-6000:] + completed.stderr[-6000:]
    assert completed.returncode == 0, report
    assert "Sanitizer" not in completed.stdout + completed.stderr, report
