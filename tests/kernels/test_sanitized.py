"""The emulated kernel suite once more with AddressSanitizer: no kernel reads or writes outside its tensors.

On a GPU an access past a tensor is an illegal-address fault (or silent corruption); the emulator builds
the kernels with `-fsanitize=address,alignment` and runs them in a child pytest whose Python has the
sanitizer's runtime preloaded, so such an access (or a misaligned vector access) aborts the child with a
report naming the kernel line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.cuda_emulator.host_library import COMPILER, compiler_available

REPO = Path(__file__).resolve().parents[2]


def sanitizer_runtime() -> str | None:
    """The path of the compiler's AddressSanitizer runtime, or None."""
    if not compiler_available():
        return None
    completed = subprocess.run(
        [COMPILER, "-print-file-name=libasan.so"], capture_output=True, text=True, check=False
    )
    path = completed.stdout.strip()
    return path if completed.returncode == 0 and os.path.isabs(path) and os.path.exists(path) else None


pytestmark = pytest.mark.skipif(sanitizer_runtime() is None, reason="needs g++ with AddressSanitizer")


def sanitized_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PAGEWIRE_EMULATOR_ASAN="1",
        LD_PRELOAD=str(sanitizer_runtime()),
        # Python and torch allocate for good at exit; only out-of-bounds accesses matter here.
        ASAN_OPTIONS="detect_leaks=0",
        UBSAN_OPTIONS="print_stacktrace=1",
        PYTHONPATH=str(REPO),
    )
    return env


def run_sanitized(arguments: list[str], timeout_s: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=REPO,
        env=sanitized_env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


FAULTY_KERNELS = {
    "heap-buffer-overflow": (
        "__global__ void past_the_end_kernel(float* data) { data[threadIdx.x] = 1.0f; }",
        "past_the_end_kernel",
        "(np.uint64(data.data_ptr()),)",
        (33, 1, 1),
    ),
    "misaligned address": (
        "__global__ void misaligned_kernel(float* data) { "
        + "data[0] = __uint_as_float(reinterpret_cast<const uint4*>(data + 1)->x); }",
        "misaligned_kernel",
        "(np.uint64(data.data_ptr()),)",
        (1, 1, 1),
    ),
}
DRIVER = """
import numpy as np, torch
from tests.helpers.cuda_emulator.host_library import HostKernelLibrary, host_source_of
library = HostKernelLibrary(host_source_of('#include "common.cuh"\\n' + {source!r}), ({name!r},))
data = torch.zeros(32)
library.launch({name!r}, (1, 1, 1), {block!r}, {args})
"""


@pytest.mark.parametrize("report", sorted(FAULTY_KERNELS))
def test_the_sanitizers_catch_what_a_gpu_would_fault_on(report):
    source, name, args, block = FAULTY_KERNELS[report]
    completed = run_sanitized(
        ["-c", DRIVER.format(source=source, name=name, args=args, block=block)], timeout_s=300
    )
    assert completed.returncode != 0
    assert report in completed.stderr, completed.stderr[-3000:]
    assert name in completed.stderr


@pytest.mark.slow  # about 2.5 minutes, plus 3 for the sanitized builds: `make test-emulated` runs it
def test_the_emulated_kernel_suite_stays_inside_its_tensors():
    completed = run_sanitized(
        [
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not slow",
            "-k",
            "emulated",
            "tests/kernels/test_cuda_attention.py",
            "tests/kernels/test_cuda_cache_ops.py",
            "tests/kernels/test_cuda_sgmv.py",
        ],
        timeout_s=1200,
    )
    report = completed.stdout[-3000:] + completed.stderr[-6000:]
    assert completed.returncode == 0, report
    assert "AddressSanitizer" not in completed.stderr, report
