"""`tusserver` in subprocesses, for restarts, kills and several processes on one upload; and
the pids and ports such tests look at."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.tus import upload_id_of
from tests.support.waiting import NotReached, wait_until_sync


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str  # the endpoint, with its trailing slash
    data_dir: Path
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout_s)

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None, self.url
        return port

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


StartProcess = Callable[..., ServerProcess]  # the `processes` fixture

# What one long body may add to a server process's peak resident memory: its blocks
# (--body-memory), its buffers, never the body. The big-PATCH and big-form tests share it.
BODY_PEAK_GROWTH_MIB = 48


def memory_kib(pid: int, field: str) -> int:
    """VmRSS or VmHWM (the peak resident memory so far) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def start_process(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `tusserver` in a subprocess on a free port; wait until it listens."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"tusserver-{time.monotonic_ns()}.log"
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tusserver", "--host", "127.0.0.1", "--port", "0",
         "--data-dir", str(data_dir), "--allowed-hosts", "127.0.0.1", *args],
        stdout=log_file, stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    log_file.close()
    try:
        return ServerProcess(process, listening_url(process, log_path), data_dir, log_path)
    except AssertionError:
        process.kill()
        process.wait()
        raise


def listening_url(process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 30) -> str:
    """The URL a starting tusserver announces in its log; AssertionError (with the log) if
    the process exits or the deadline passes first."""

    def announced() -> str | None:
        log = log_path.read_text(errors="replace")
        match = re.search(r"listening on (https?://\S+|unix:\S+)", log)
        return match.group(1) if match else None

    with contextlib.suppress(NotReached):  # said below, with the log
        wait_until_sync(
            lambda: announced() is not None or process.poll() is not None, timeout_s, 0.05
        )
    url = announced()
    if url is None:
        raise AssertionError(f"tusserver did not start:\n{log_path.read_text(errors='replace')}")
    return url


async def start_server(processes: StartProcess, data_dir: Path, *args: str) -> ServerProcess:
    """Start a tusserver process off the event loop (starting waits for it to listen)."""
    return await asyncio.to_thread(processes, data_dir, *args)


def tusserver_process(data_dir: Path, *args: str) -> Iterator[ServerProcess]:
    """A `tusserver` subprocess (its own embedded Valkey) for a module's tests; stopped after."""
    process = start_process(data_dir, *args)
    try:
        yield process
    finally:
        try:
            if process.stop() != 0:
                print(process.log())
        except subprocess.TimeoutExpired:
            process.process.kill()
            process.process.wait()
            pidfile = data_dir / "redis" / "valkey.pid"  # a killed supervisor leaves it behind
            if pidfile.exists():
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


def on(server: ServerProcess, url: str) -> str:
    """The upload's URL on `server` (a restarted process listens on another port)."""
    return server.url + upload_id_of(url)


def pid_is_gone(pid: int) -> bool:
    """True when the pid no longer exists or is a zombie nobody has reaped yet."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state == "Z"


def kill_quietly(pid: int | None) -> None:
    if pid is not None and not pid_is_gone(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
