"""Stopping a background asyncio task: the one way every loop the scheduler runs is shut down."""

from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task[None] | None) -> None:
    """Cancels `task` (None: nothing to stop) and waits until it has finished; its cancellation is
    absorbed, any other exception it ends with is raised here."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
