"""One way for a test to wait: check something observable until it holds, with a deadline.

A deadline bounds a wait for a state the test can see (an offset, a file size, a log line);
it is never a sleep that gives a race time to pass.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

Check = Callable[[], bool | Awaitable[bool]]
Description = str | Callable[[], str]


class NotReached(AssertionError):
    """What a test waited for did not happen before its deadline."""


def _failure(what: Description, timeout_s: float) -> NotReached:
    said = what() if callable(what) else what
    return NotReached(f"not reached in {timeout_s:g} s: {said}")


async def wait_until(
    check: Check,
    timeout_s: float = 10.0,
    every_s: float = 0.02,
    *,
    what: Description = "the condition",
) -> None:
    """Call `check` (a plain or a coroutine function) every `every_s` until it returns True;
    NotReached, saying `what` (a string, or a function called at the deadline), once
    `timeout_s` has passed. A check may also perform an attempt (a request that a fault may
    refuse) and say whether it succeeded."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = check()
        holds = (await outcome) if isinstance(outcome, Awaitable) else outcome
        if holds:
            return
        if time.monotonic() > deadline:
            raise _failure(what, timeout_s)
        await asyncio.sleep(every_s)


def wait_until_sync(
    check: Callable[[], bool],
    timeout_s: float = 10.0,
    every_s: float = 0.02,
    *,
    what: Description = "the condition",
) -> None:
    """`wait_until` for code without an event loop (subprocesses, urllib, threads)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise _failure(what, timeout_s)
        time.sleep(every_s)
