"""What `tusserver upload` shows while it works: rich progress bars on a terminal (one line
per active file and a total, each with bytes, rate and ETA), plain lines anywhere else."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import Protocol, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from tusserver.uploader.files import LocalFile
from tusserver.uploader.transfer import FileResult

NAME_COLUMN_CHARS = 40
PLAIN_PROGRESS_EVERY_S = 5.0


def format_size(nbytes: float) -> str:
    """Binary units, one decimal: `0 B`, `512 B`, `1.5 KiB`, `3.0 MiB`."""
    if nbytes < 1024:
        return f"{int(nbytes)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        nbytes /= 1024
        if nbytes < 1024 or unit == "TiB":
            break
    return f"{nbytes:.1f} {unit}"


def short_name(relative_path: str, width: int = NAME_COLUMN_CHARS) -> str:
    """The path, cut at the front to `width` characters (the file name matters most)."""
    return relative_path if len(relative_path) <= width else "…" + relative_path[-width + 1 :]


class Reporter(Protocol):
    def begin(self, files: int, total_bytes: int) -> None: ...
    def file_started(self, file: LocalFile, offset: int) -> None: ...
    def file_sent(self, file: LocalFile, nbytes: int) -> None: ...
    def file_offset(self, file: LocalFile, offset: int) -> None: ...
    def file_done(self, result: FileResult) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self) -> None: ...


def _done_line(result: FileResult) -> str:
    name, size = result.file.relative_path, format_size(result.file.size)
    if result.outcome == "skipped":
        return f"skip {name} ({size}, uploaded before)"
    if result.outcome == "failed":
        return f"FAIL {name}: {result.detail}"
    return f"done {name} ({size}" + (f", {result.detail})" if result.detail else ")")


class RichReporter:
    """Bars on a terminal. The total counts the bytes this run has to send: files skipped
    as done, bytes a resumed upload already has and files that fail are taken out of it."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(file=sys.stdout, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description}", markup=False),
            BarColumn(),
            DownloadColumn(),  # decimal units, as rich's TransferSpeedColumn shows
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.console,
        )
        self._lock = threading.Lock()
        self._tasks: dict[Path, TaskID] = {}
        self._positions: dict[Path, int] = {}
        self._total = TaskID(-1)
        self._files = self._finished = self._total_bytes = self._sent_total = 0

    def begin(self, files: int, total_bytes: int) -> None:
        self._files, self._total_bytes = files, total_bytes
        self.progress.start()
        self._total = self.progress.add_task(self._total_name(), total=total_bytes)

    def _total_name(self) -> str:
        return f"total: {self._finished}/{self._files} files"

    def file_started(self, file: LocalFile, offset: int) -> None:
        with self._lock:
            self._tasks[file.path] = self.progress.add_task(
                short_name(file.relative_path), total=file.size, completed=offset
            )
            self._positions[file.path] = offset
            self._total_bytes -= offset
            self.progress.update(self._total, total=self._total_bytes)

    def file_sent(self, file: LocalFile, nbytes: int) -> None:
        with self._lock:
            task = self._tasks.get(file.path)
            if task is None:
                return
            self._positions[file.path] += nbytes
            self._sent_total += nbytes
            self.progress.advance(task, nbytes)
            self.progress.advance(self._total, nbytes)

    def file_offset(self, file: LocalFile, offset: int) -> None:
        with self._lock:
            task = self._tasks.get(file.path)
            if task is None:
                return
            unsent = self._positions[file.path] - offset  # sent, but the server has not got it
            self._positions[file.path] = offset
            self._sent_total -= unsent
            self.progress.update(task, completed=offset)
            self.progress.update(self._total, completed=self._sent_total)

    def file_done(self, result: FileResult) -> None:
        file = result.file
        with self._lock:
            task = self._tasks.pop(file.path, None)
            position = self._positions.pop(file.path, 0)
            if task is not None:
                self.progress.remove_task(task)
            if result.outcome != "uploaded":  # what it did not send leaves the total
                self._total_bytes -= file.size - position
            self._finished += 1
            self.progress.update(
                self._total, total=self._total_bytes, description=self._total_name()
            )
        style = {"uploaded": "green", "skipped": "dim", "failed": "bold red"}[result.outcome]
        # a Text, not print(style=): that style would also tint the bars drawn after it
        self.console.print(Text(_done_line(result), style=style))

    def note(self, text: str) -> None:
        self.console.print(Text(text, style="yellow"))

    def close(self) -> None:
        self.progress.stop()


class PlainReporter:
    """One line per event, for logs and pipes: start, progress every few seconds per file,
    done or skip; failures and retries go to stderr."""

    def __init__(
        self,
        out: TextIO | None = None,
        err: TextIO | None = None,
        every_s: float = PLAIN_PROGRESS_EVERY_S,
    ) -> None:
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.every_s = every_s
        self._lock = threading.Lock()
        self._positions: dict[Path, int] = {}
        self._last_line_at: dict[Path, float] = {}

    def _print(self, line: str, stream: TextIO | None = None) -> None:
        with self._lock:
            print(line, file=stream or self.out, flush=True)

    def begin(self, files: int, total_bytes: int) -> None:
        pass  # the command prints what it is about to do

    def file_started(self, file: LocalFile, offset: int) -> None:
        with self._lock:
            self._positions[file.path] = offset
            self._last_line_at[file.path] = time.monotonic()
        resuming = f", resuming at {format_size(offset)}" if offset else ""
        self._print(f"start {file.relative_path} ({format_size(file.size)}{resuming})")

    def file_sent(self, file: LocalFile, nbytes: int) -> None:
        now = time.monotonic()
        with self._lock:
            if file.path not in self._positions:
                return
            self._positions[file.path] += nbytes
            if now - self._last_line_at[file.path] < self.every_s:
                return
            self._last_line_at[file.path] = now
            position = self._positions[file.path]
        percent = 100 * position // max(file.size, 1)
        self._print(
            f"  {file.relative_path}: {percent}% "
            f"({format_size(position)} of {format_size(file.size)})"
        )

    def file_offset(self, file: LocalFile, offset: int) -> None:
        with self._lock:
            if file.path in self._positions:
                self._positions[file.path] = offset

    def file_done(self, result: FileResult) -> None:
        with self._lock:
            self._positions.pop(result.file.path, None)
            self._last_line_at.pop(result.file.path, None)
        failed = result.outcome == "failed"
        self._print(_done_line(result), self.err if failed else self.out)

    def note(self, text: str) -> None:
        self._print(text, self.err)

    def close(self) -> None:
        pass
