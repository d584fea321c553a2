"""Stopping the backend's long-running tasks (the idle watch, the orphan reaper, the pool's filler, a link's
reader): cancelled, then awaited, so that nothing of theirs runs on once their owner has stopped."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def stop_task(task: asyncio.Future[Any] | None) -> None:
    """Cancel `task` (None: nothing to stop) and wait for its end; its cancellation is not the caller's."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
