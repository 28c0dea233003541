from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import importlib, pkgutil, sys
import scheduler_service
names = sorted(m.name for m in pkgutil.iter_modules(scheduler_service.__path__, "scheduler_service."))
for name in names:
    importlib.import_module(name)
print(",".join(names))
forbidden = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "cupy", "executor_service"})
assert not forbidden, f"scheduler_service imported {forbidden}"
"""


def test_scheduler_service_imports_neither_torch_nor_cupy_nor_the_executor() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    imported = completed.stdout.strip().split(",")
    assert {
        "scheduler_service.block_pool",
        "scheduler_service.free_block_queue",
        "scheduler_service.kv_cache_manager",
        "scheduler_service.plan_encoder",
        "scheduler_service.scheduler",
        "scheduler_service.scheduler_config",
        "scheduler_service.sequence",
    } <= set(imported)
