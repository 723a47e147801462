"""CPU time and memory of a server's whole process tree, read from /proc (Linux only).

A server is its root process and every descendant: tusserver's supervisor, its workers and
its embedded Valkey; the bare handler's workers; Node's single process. `Sampler` reads the
tree every few hundred milliseconds while a scenario runs and keeps, per process, the peak
RSS and the (progress, RSS) samples from which the RSS slope is fitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


@dataclass(frozen=True)
class ProcessId:
    """A pid with its start time, so a reused pid is never taken for the process we saw."""

    pid: int
    started_ticks: int


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rfind(")") + 2 :].split()


def identify(pid: int) -> ProcessId | None:
    fields = _stat_fields(pid)
    return None if fields is None else ProcessId(pid, int(fields[19]))


def is_alive(process: ProcessId) -> bool:
    fields = _stat_fields(process.pid)
    return fields is not None and int(fields[19]) == process.started_ticks and fields[0] != "Z"


def process_tree(root: int) -> list[ProcessId]:
    """The root and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: list[ProcessId] = []
    waiting = [root]
    while waiting:
        pid = waiting.pop()
        process = identify(pid)
        if process is not None:
            found.append(process)
        waiting.extend(children.get(pid, []))
    return found


def cpu_seconds(process: ProcessId) -> float:
    """User + system CPU time of the process so far; 0 once it is gone."""
    fields = _stat_fields(process.pid)
    if fields is None or int(fields[19]) != process.started_ticks:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S


def rss_bytes(process: ProcessId) -> int:
    """Resident set size now; 0 once the process is gone."""
    try:
        resident_pages = int((PROC / str(process.pid) / "statm").read_text().split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0
    return resident_pages * PAGE_BYTES


def command_name(process: ProcessId) -> str:
    try:
        return (PROC / str(process.pid) / "comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return "?"


@dataclass
class ProcessTrack:
    """What one process of the tree did during a scenario."""

    name: str
    cpu_at_start_s: float
    peak_rss_bytes: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (progress, rss bytes)


@dataclass
class Usage:
    """A scenario's server-side cost: CPU seconds of the tree, peak RSS of its largest
    process and of the tree as a whole, and the steepest RSS slope of any process."""

    cpu_s: float
    peak_rss_mib: float
    peak_rss_sum_mib: float
    rss_by_process_mib: dict[str, float]
    cpu_by_process_s: dict[str, float]
    rss_slope_mib_per_gib: float | None


class Sampler:
    """Samples a server's process tree until stopped. `progress` reports how far the
    client has got (bytes sent) so RSS can be fitted against bytes, not time."""

    def __init__(
        self, root_pid: int, *, interval_s: float = 0.2, progress: Callable[[], float] | None = None
    ) -> None:
        self.root_pid = root_pid
        self.interval_s = interval_s
        self.progress = progress or (lambda: 0.0)
        self.tracks: dict[ProcessId, ProcessTrack] = {}
        self.peak_sum_bytes = 0
        self._task: asyncio.Task[None] | None = None

    def _sample(self) -> None:
        progress = self.progress()
        total = 0
        for process in process_tree(self.root_pid):
            track = self.tracks.get(process)
            if track is None:
                track = ProcessTrack(command_name(process), cpu_seconds(process))
                self.tracks[process] = track
            rss = rss_bytes(process)
            total += rss
            track.peak_rss_bytes = max(track.peak_rss_bytes, rss)
            track.samples.append((progress, rss))
        self.peak_sum_bytes = max(self.peak_sum_bytes, total)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self._sample()

    def start(self) -> None:
        self._sample()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> Usage:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.usage()

    def usage(self) -> Usage:
        """What the tree has cost from `start` until now (sampling it once more)."""
        self._sample()
        cpu_by_process: dict[str, float] = {}
        by_process: dict[str, float] = {}
        for process, track in self.tracks.items():
            key = f"{track.name}[{process.pid}]"
            by_process[key] = round(track.peak_rss_bytes / MIB, 1)
            cpu_by_process[key] = round(max(0.0, cpu_seconds(process) - track.cpu_at_start_s), 2)
        cpu = sum(cpu_by_process.values())
        slopes = [s for s in (rss_slope(t.samples) for t in self.tracks.values()) if s is not None]
        return Usage(
            cpu_s=round(cpu, 2),
            peak_rss_mib=round(max((t.peak_rss_bytes for t in self.tracks.values()), default=0)
                               / MIB, 1),
            peak_rss_sum_mib=round(self.peak_sum_bytes / MIB, 1),
            rss_by_process_mib=by_process,
            cpu_by_process_s=cpu_by_process,
            rss_slope_mib_per_gib=round(max(slopes), 3) if slopes else None,
        )  # fmt: skip


def cpu_pressure_us() -> int | None:
    """Microseconds (since boot) in which some runnable task waited for a CPU: Linux PSI,
    /proc/pressure/cpu. None where the kernel does not report it."""
    try:
        some = (PROC / "pressure" / "cpu").read_text().splitlines()[0]
    except (FileNotFoundError, OSError, IndexError):
        return None
    return int(some.rsplit("total=", 1)[1])


class PressureWindow:
    """The share of wall time, from now until `percent()`, in which some task on this
    machine waited for a CPU: how contended (by us or by anyone) the cores were."""

    def __init__(self) -> None:
        self._start_us = cpu_pressure_us()
        self._started = time.monotonic()

    def percent(self) -> float | None:
        end_us = cpu_pressure_us()
        elapsed_us = (time.monotonic() - self._started) * 1e6
        if self._start_us is None or end_us is None or elapsed_us <= 0:
            return None
        return round(100 * (end_us - self._start_us) / elapsed_us, 1)


def rss_slope(samples: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of RSS (MiB) over progress (GiB), fitted on the samples after the
    first tenth of the progress (start-up growth is not a leak); None without progress."""
    if not samples:
        return None
    last = max(progress for progress, _ in samples)
    if last <= 0:
        return None
    points = [(p / 2**30, rss / MIB) for p, rss in samples if p >= last / 10]
    if len(points) < 3:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread
