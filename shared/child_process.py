"""Stopping a child process the way every pagewire launcher does: SIGTERM, a grace period, then SIGKILL."""

from __future__ import annotations

import signal
import subprocess

STOP_GRACE_SECONDS = 15.0


def stop_child(process: subprocess.Popen, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
    """Asks `process` to shut down gracefully (SIGTERM) and kills it if it is still running after
    `grace_seconds`; returns once it has exited. Does nothing to a process that already exited."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
