"""Stopping background tasks reliably.

On Python 3.11, `asyncio.wait_for` (which redis-py uses around its commands) can swallow a
cancellation that lands just as the command completes, so one `task.cancel()` may leave a
loop running. Every task tusserver stops goes through `cancel_and_wait`.
"""

from __future__ import annotations

import asyncio
from typing import Any

_RECHECK_S = 0.05


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended, cancelling again if a cancel was lost."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=_RECHECK_S)
    if not task.cancelled():
        task.exception()  # retrieved: a failure was logged where it happened


def was_cancelled() -> bool:
    """True if the running task was asked to stop, even if the CancelledError was lost on the
    way (loops check this between steps)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
