"""One kernel family built for the host: g++ compiles the `.cu` text against `cuda_host.h` into a library.

The kernel text is exactly what NVRTC compiles for the GPU, except that `ptx.cuh` is swapped for its
plain C++ twin `ptx_host.cuh`. Libraries are cached under `build/cuda_emulator/`, keyed by a hash of
everything that goes into them, so an unchanged kernel is compiled once per checkout.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from executor_service.ops.cuda_kernels import KernelFamily, paste_includes

EMULATOR_DIR = Path(__file__).resolve().parent
BUILD_DIR = EMULATOR_DIR.parents[2] / "build" / "cuda_emulator"
COMPILER = os.environ.get("CXX", "g++")
FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-w", "-U_FORTIFY_SOURCE")
# PAGEWIRE_EMULATOR_SANITIZER builds the kernels with a sanitizer; the Python process must run with its
# runtime preloaded (see tests/kernels/test_sanitized.py). "address": AddressSanitizer and alignment
# checks report any access outside a tensor and any misaligned vector access (what a GPU reports as an
# illegal or misaligned address). "thread": ThreadSanitizer reports races between the threads of a CTA
# (see cuda_host.h).
SANITIZER = os.environ.get("PAGEWIRE_EMULATOR_SANITIZER", "")
SANITIZER_FLAGS: dict[str, tuple[str, ...]] = {
    "": (),
    "address": (
        "-fsanitize=address,alignment",
        "-fno-sanitize-recover=alignment",
        "-fno-omit-frame-pointer",
        "-g",
    ),
    "thread": ("-fsanitize=thread", "-g"),
}
ERROR_BYTES = 512

# numpy scalar kind -> the parameter codes of `pw_emu::signature` it may be passed for.
_ACCEPTED_CODES = {"u": ("p", "u"), "i": ("i",), "f": ("f",)}
_CTYPES = {
    ("u", 8): ctypes.c_uint64,
    ("u", 4): ctypes.c_uint32,
    ("i", 8): ctypes.c_int64,
    ("i", 4): ctypes.c_int32,
    ("f", 4): ctypes.c_float,
}


class EmulatorError(RuntimeError):
    """A kernel could not be built for the host, or a launch broke a rule the GPU would enforce."""


def compiler_available() -> bool:
    return shutil.which(COMPILER) is not None


def _host_headers() -> dict[str, str]:
    return {"ptx.cuh": (EMULATOR_DIR / "ptx_host.cuh").read_text(encoding="utf-8")}


def host_source(family: KernelFamily) -> str:
    """The family's kernel text as NVRTC gets it, but with the host twin of `ptx.cuh` pasted in."""
    return family.source(_host_headers())


def host_source_of(text: str) -> str:
    """Kernel text that includes headers of `kernels/` (as a family's does), ready for the host build."""
    return paste_includes(text, _host_headers())


def _program(kernel_source: str, name_expressions: tuple[str, ...]) -> str:
    lines = ['#include "cuda_host.h"', kernel_source]
    for index, name in enumerate(name_expressions):
        lines += [
            f'extern "C" int pw_launch_{index}(const unsigned* grid, const unsigned* block, void** args, '
            + "char* error, int error_bytes) {",
            f"  return pw_emu::launch(&{name}, grid, block, args, error, error_bytes);",
            "}",
            f'extern "C" int pw_signature_{index}(char* out, int out_bytes) {{',
            f"  return pw_emu::signature(&{name}, out, out_bytes);",
            "}",
        ]
    return "\n".join(lines) + "\n"


def _build(program: str) -> Path:
    emulator_header = (EMULATOR_DIR / "cuda_host.h").read_text(encoding="utf-8")
    if SANITIZER not in SANITIZER_FLAGS:
        raise EmulatorError(f"PAGEWIRE_EMULATOR_SANITIZER={SANITIZER!r}: use address or thread")
    flags = FLAGS + SANITIZER_FLAGS[SANITIZER]
    key = hashlib.sha256("\0".join([program, emulator_header, COMPILER, *flags]).encode()).hexdigest()[:24]
    library = BUILD_DIR / f"kernels-{key}.so"
    if library.is_file():
        return library
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    # The source stays beside the library, so that sanitizer reports point at lines one can read.
    source = library.with_suffix(".cpp")
    source.write_text(program, encoding="utf-8")
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as scratch:
        built = Path(scratch) / "kernels.so"
        command = [COMPILER, *flags, f"-I{EMULATOR_DIR}", str(source), "-o", str(built)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise EmulatorError(f"host build of the kernels failed:\n{completed.stderr[-6000:]}")
        os.replace(built, library)
    return library


class HostKernelLibrary:
    """The host build of `name_expressions` of `kernel_source`; `launch` runs a kernel over a whole grid."""

    def __init__(self, kernel_source: str, name_expressions: tuple[str, ...]) -> None:
        self.name_expressions = name_expressions
        self._library = ctypes.CDLL(str(_build(_program(kernel_source, name_expressions))))
        self._signatures = {name: self._signature(index) for index, name in enumerate(name_expressions)}

    def _signature(self, index: int) -> tuple[tuple[str, int], ...]:
        text = ctypes.create_string_buffer(1024)
        getattr(self._library, f"pw_signature_{index}")(text, len(text))
        return tuple((word[0], int(word[1:])) for word in text.value.decode().split())

    def launch(
        self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], args: tuple[Any, ...]
    ) -> None:
        """Runs `name` over `grid`; raises EmulatorError for arguments that do not match its parameters
        and for launches the GPU would hang on (a barrier that not every thread reaches)."""
        if name not in self._signatures:
            raise EmulatorError(f"{name} was not compiled with {self.name_expressions}")
        values = self._arguments(name, args)
        pointers = (ctypes.c_void_p * len(values))(
            *(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values)
        )
        if min(grid) < 1 or min(block) < 1:
            raise EmulatorError(f"{name}: empty launch grid {grid} x block {block}")
        error = ctypes.create_string_buffer(ERROR_BYTES)
        index = self.name_expressions.index(name)
        status = getattr(self._library, f"pw_launch_{index}")(
            (ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), pointers, error, ERROR_BYTES
        )
        if status != 0:
            raise EmulatorError(f"{name}: {error.value.decode()}")

    def _arguments(self, name: str, args: tuple[Any, ...]) -> list[ctypes._SimpleCData]:
        signature = self._signatures[name]
        if len(args) != len(signature):
            raise EmulatorError(f"{name} takes {len(signature)} arguments, got {len(args)}")
        values = []
        for position, (arg, (code, size)) in enumerate(zip(args, signature, strict=True)):
            if not isinstance(arg, np.generic):
                raise EmulatorError(
                    f"{name} argument {position}: pass numpy scalars, got {type(arg).__name__}"
                )
            kind, itemsize = arg.dtype.kind, arg.dtype.itemsize
            if code not in _ACCEPTED_CODES.get(kind, ()) or itemsize != size:
                raise EmulatorError(
                    f"{name} argument {position}: a {arg.dtype} value for a parameter of kind {code!r} "
                    f"and {size} bytes"
                )
            values.append(_CTYPES[(kind, itemsize)](arg.item()))
        return values


@functools.cache
def host_library(family: KernelFamily, name_expressions: tuple[str, ...]) -> HostKernelLibrary:
    """One build per (family, instantiation set) and process, like CuPy's module cache."""
    return HostKernelLibrary(host_source(family), name_expressions)
