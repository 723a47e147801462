"""The process's log: one handler on stderr for every logger, the access log included.

Under load the access log is one line per request, and writing each line as it comes is a
system call per request on the event loop. Lines logged on an event loop's thread are kept
until the end of that loop turn and written together (one write for every request the turn
finished); lines from any other thread, and `flush` (at exit, and before a worker's
`os._exit`), write what waits at once, in the order it was logged. A SIGKILL loses at most
the lines of the turn it interrupts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(name)s %(message)s"
JSON_FORMAT = "%(message)s"  # the access log's lines are JSON objects already


def setup(*, json_lines: bool, stream: TextIO) -> None:
    """Log INFO and above of every logger to `stream`, batched per loop turn."""
    # Attributes of a record that no format here shows; logging documents switching them
    # off to save their cost on every record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = TurnBatchedHandler(stream)
    handler.setFormatter(_Formatter(JSON_FORMAT if json_lines else TEXT_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


class TurnBatchedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the lines an event loop's thread logs once per turn."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._waiting: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None  # the one whose turn ends them
        # A process forked meanwhile (a worker) leaves the waiting lines to its parent.
        handler = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_waiting(handler()))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self._waiting.append(line)
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or (self._loop is not None and loop is not self._loop):
            self._write_waiting()
        elif self._loop is None:
            self._loop = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_waiting()

    def _write_waiting(self) -> None:
        """Write every waiting line (the caller holds the lock)."""
        text = "".join(self._waiting)
        self._waiting.clear()
        self._loop = None
        if not text:
            return
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or broken: there is nowhere to say so
            pass


def _forget_waiting(handler: TurnBatchedHandler | None) -> None:
    if handler is not None:
        handler._waiting.clear()
        handler._loop = None


class _Formatter(logging.Formatter):
    """logging's formatter, formatting the date part of `asctime` once per second."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            struct = self.converter(record.created)
            self._second_text = time.strftime(self.default_time_format, struct)
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"  # logging's own default
