"""Builds (once per machine, cached on disk) and loads the CPU kernels: paged attention, RMSNorm and rotary."""

from __future__ import annotations

import functools
import hashlib
import shutil
import sys
from types import ModuleType

import structlog

from executor_service.ops import cpu_elementwise_source
from executor_service.ops.cpu_kernel_source import CPP_SOURCE

log = structlog.get_logger(__name__)


class CpuKernelUnavailable(RuntimeError):
    """The kernel cannot be built here (no C++ compiler or ninja); callers fall back to torch ops."""


@functools.cache
def load_cpu_kernels() -> ModuleType:
    """The compiled module with `paged_attention(...)`, `rms_norm(...)` and `rotary_embedding(...)` (one
    build: most of a build's time is parsing torch's headers); raises CpuKernelUnavailable if it cannot
    build."""
    return build_cpu_extension(
        "CPU attention and elementwise kernels",
        "pagewire_cpu_attention",
        CPP_SOURCE + cpu_elementwise_source.CPP_SOURCE,
        ["paged_attention", "rms_norm", "rotary_embedding"],
    )


def build_cpu_extension(what: str, name_prefix: str, source: str, functions: list[str]) -> ModuleType:
    """Compiles (or loads from torch's extension cache) C++ `source` exporting `functions`; raises
    CpuKernelUnavailable naming `what` when it cannot.

    The module name carries a hash of the source, the torch version and the environment, so an edited
    kernel or another torch never loads a stale build from torch's extension cache (`TORCH_EXTENSIONS_DIR`, default
    `~/.cache/torch_extensions`).
    """
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if missing:
        raise CpuKernelUnavailable(f"building the {what} needs {' and '.join(missing)} on PATH")
    from torch.utils.cpp_extension import load_inline

    import torch

    # The environment's prefix too: torch rebuilds an extension whose build flags (include paths)
    # changed, so two virtualenvs sharing one name would rebuild it in turn on every start.
    digest = hashlib.sha256(f"{torch.__version__}\n{sys.prefix}\n{source}".encode()).hexdigest()[:12]
    try:
        return load_inline(
            name=f"{name_prefix}_{digest}",
            cpp_sources=[source],
            functions=functions,
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 (a compiler failure of any kind means: fall back)
        raise CpuKernelUnavailable(f"building the {what} failed: {error}") from error
