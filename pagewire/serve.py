"""`pagewire serve`: an executor child process and the scheduler in this process, started together."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

import structlog

from executor_service.executor_config import ExecutorConfig
from pagewire.flags import config_to_argv
from scheduler_service.engine_config import EngineConfig
from shared.child_process import stop_child

log = structlog.get_logger(__name__)

CHILD_POLL_SECONDS = 0.2


def executor_command(
    config: ExecutorConfig, extra_args: Sequence[str] = (), log_args: Sequence[str] = ()
) -> list[str]:
    """The command line that starts an executor process with `config` (then `extra_args`, which win).
    The executor token is left out: it goes in the child's environment, not on a command line anyone
    on the machine can list."""
    return [
        sys.executable, "-m", "pagewire", *log_args, "executor", *config_to_argv(config, skip=("executor_token",)),
        *extra_args,
    ]


async def _exited(child: subprocess.Popen) -> int:
    while child.poll() is None:
        await asyncio.sleep(CHILD_POLL_SECONDS)
    return child.returncode


def serve_both(command: Sequence[str], engine_config: EngineConfig, env: Mapping[str, str] | None = None) -> int:
    """Starts the executor `command` as a child, serves the scheduler here until SIGTERM/SIGINT or the
    child's exit, then stops both. Returns 0, or 1 when the executor exited by itself; raises the
    scheduler's ValueError (start-up settings the executor cannot serve). `env` is added to the child's
    environment."""
    from scheduler_service.server import serve

    # Its own process group: Ctrl-C reaches only this process, which then stops the executor, so an
    # executor that exits while the scheduler serves has always died by itself.
    executor = subprocess.Popen(list(command), process_group=0, env={**os.environ, **(env or {})})
    log.info("executor_started", pid=executor.pid, command=" ".join(command[2:]))
    try:
        asyncio.run(serve(engine_config, stop_when=_exited(executor)))
    finally:
        exited_by_itself = executor.poll() is not None
        stop_child(executor)
    if exited_by_itself:
        log.error(
            "executor_exited", pid=executor.pid, returncode=executor.returncode,
            fix="see the executor's error above; `pagewire executor --help` lists its flags",
        )
        return 1
    return 0
