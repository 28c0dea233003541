"""Compiles CUDA C to cubin with NVRTC through ctypes: no CuPy, no GPU and no driver needed.

The library comes from the `nvidia-cuda-nvrtc` wheel (CUDA 13: `nvidia/cu13/lib`, CUDA 12:
`nvidia/cuda_nvrtc/lib`) or a system CUDA install. ptxas's resource report (`--ptxas-options=-v`,
only produced when compiling to cubin) is parsed into registers, stack frame and spill bytes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

_WHEEL_LIBRARY_DIRS = ("cu13/lib", "cuda_nvrtc/lib")
_SYSTEM_LIBRARY_DIRS = ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib")


class NvrtcError(RuntimeError):
    """NVRTC is missing, or a program failed to compile; `log` holds the compiler's output."""

    def __init__(self, message: str, log: str = "") -> None:
        super().__init__(f"{message}\n{log}" if log else message)
        self.log = log


@dataclass(frozen=True, slots=True)
class KernelResources:
    """ptxas's report for one kernel on one architecture."""

    registers: int
    stack_frame_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    shared_bytes: int

    @property
    def spills(self) -> bool:
        return self.spill_store_bytes > 0 or self.spill_load_bytes > 0


@dataclass(frozen=True, slots=True)
class CompiledProgram:
    """One NVRTC program compiled to cubin for `arch`; `resources` is keyed by name expression."""

    arch: str
    cubin: bytes
    log: str
    lowered_names: dict[str, str]
    resources: dict[str, KernelResources]


def _candidate_libraries() -> list[Path]:
    candidates: list[Path] = []
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for root in roots:
        for subdir in _WHEEL_LIBRARY_DIRS:
            candidates += sorted(Path(root, subdir).glob("libnvrtc.so.*"))
    for directory in _SYSTEM_LIBRARY_DIRS:
        candidates += sorted(Path(directory).glob("libnvrtc.so.*"))
    return [path for path in candidates if "alt" not in path.name and "builtins" not in path.name]


@functools.cache
def load_nvrtc() -> ctypes.CDLL:
    """The NVRTC shared library, with its builtins preloaded so NVRTC finds them without LD_LIBRARY_PATH."""
    candidates = _candidate_libraries()
    found = ctypes.util.find_library("nvrtc")
    if not candidates and found is None:
        raise NvrtcError(
            "NVRTC was not found: install the dev extras (`pip install -e '.[dev]'`, which pins "
            "nvidia-cuda-nvrtc) or a CUDA toolkit"
        )
    path = candidates[0] if candidates else Path(found or "")
    for builtins in sorted(path.parent.glob("libnvrtc-builtins.so.*")):
        if "alt" not in builtins.name:
            ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    library = ctypes.CDLL(str(path))
    handle = ctypes.c_void_p
    library.nvrtcGetErrorString.restype = ctypes.c_char_p
    library.nvrtcGetErrorString.argtypes = [ctypes.c_int]
    library.nvrtcCreateProgram.argtypes = [
        ctypes.POINTER(handle),
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_char_p),
        ctypes.POINTER(ctypes.c_char_p),
    ]
    library.nvrtcAddNameExpression.argtypes = [handle, ctypes.c_char_p]
    library.nvrtcCompileProgram.argtypes = [handle, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    library.nvrtcGetProgramLogSize.argtypes = [handle, ctypes.POINTER(ctypes.c_size_t)]
    library.nvrtcGetProgramLog.argtypes = [handle, ctypes.c_char_p]
    library.nvrtcGetCUBINSize.argtypes = [handle, ctypes.POINTER(ctypes.c_size_t)]
    library.nvrtcGetCUBIN.argtypes = [handle, ctypes.c_char_p]
    library.nvrtcGetLoweredName.argtypes = [handle, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p)]
    library.nvrtcDestroyProgram.argtypes = [ctypes.POINTER(handle)]
    library.nvrtcVersion.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]
    return library


def nvrtc_version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(load_nvrtc().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def _check(status: int, call: str, log: str = "") -> None:
    if status != 0:
        reason = load_nvrtc().nvrtcGetErrorString(status).decode()
        raise NvrtcError(f"{call} failed: {reason}", log)


def compile_cubin(
    source: str,
    filename: str,
    arch: str,
    name_expressions: tuple[str, ...],
    options: tuple[str, ...] = (),
) -> CompiledProgram:
    """Compiles `source` for `arch` (e.g. "sm_90") with ptxas's verbose report.

    Instantiates every template named in `name_expressions`. Raises NvrtcError carrying the full
    compiler log when compilation fails.
    """
    library = load_nvrtc()
    program = ctypes.c_void_p()
    _check(
        library.nvrtcCreateProgram(ctypes.byref(program), source.encode(), filename.encode(), 0, None, None),
        "nvrtcCreateProgram",
    )
    try:
        for expression in name_expressions:
            _check(library.nvrtcAddNameExpression(program, expression.encode()), "nvrtcAddNameExpression")
        all_options = [f"--gpu-architecture={arch}", "--ptxas-options=-v", *options]
        encoded = (ctypes.c_char_p * len(all_options))(*(option.encode() for option in all_options))
        status = library.nvrtcCompileProgram(program, len(all_options), encoded)
        log = _program_log(library, program)
        _check(status, f"compiling {filename} for {arch}", log)
        size = ctypes.c_size_t()
        _check(library.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
        cubin = ctypes.create_string_buffer(size.value)
        _check(library.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
        lowered_names: dict[str, str] = {}
        for expression in name_expressions:
            lowered = ctypes.c_char_p()
            _check(
                library.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(lowered)),
                "nvrtcGetLoweredName",
            )
            lowered_names[expression] = (lowered.value or b"").decode()
    finally:
        library.nvrtcDestroyProgram(ctypes.byref(program))
    by_lowered = parse_ptxas_report(log)
    resources = {
        expression: by_lowered[lowered]
        for expression, lowered in lowered_names.items()
        if lowered in by_lowered
    }
    return CompiledProgram(arch, cubin.raw, log, lowered_names, resources)


def _program_log(library: ctypes.CDLL, program: ctypes.c_void_p) -> str:
    size = ctypes.c_size_t()
    library.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    buffer = ctypes.create_string_buffer(size.value)
    library.nvrtcGetProgramLog(program, buffer)
    return buffer.value.decode(errors="replace")


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USAGE = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_report(log: str) -> dict[str, KernelResources]:
    """Per entry function (lowered name): registers, stack frame, spills and static shared memory."""
    frames: dict[str, tuple[int, int, int]] = {}
    usage: dict[str, tuple[int, int]] = {}
    entry: str | None = None
    properties_of: str | None = None
    for line in log.splitlines():
        if match := _ENTRY.search(line):
            entry = match.group(1)
        elif match := _PROPERTIES.search(line):
            properties_of = match.group(1)
        elif (match := _FRAME.search(line)) and properties_of is not None:
            frames[properties_of] = (int(match.group(1)), int(match.group(2)), int(match.group(3)))
        elif (match := _USAGE.search(line)) and entry is not None:
            usage[entry] = (int(match.group(1)), int(match.group(2) or 0))
    return {
        name: KernelResources(registers, *frames.get(name, (0, 0, 0)), shared_bytes)
        for name, (registers, shared_bytes) in usage.items()
    }
