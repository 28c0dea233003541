"""A description of the machine a benchmark ran on, so that its numbers can be read in context."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024**2, 1)
    return None


def load_average() -> float | None:
    """The 1-minute load average; above the core count means other processes competed for the CPU."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def describe_machine() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "cpu": _cpu_model(),
        "num_cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": load_average(),
    }
