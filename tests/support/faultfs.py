"""A tusserver process whose data directory is a small tmpfs, to fill a disk for real.

`unshare -rm` gives the process its own user and mount namespaces, so an unprivileged user
can mount a size-limited tmpfs over the data directory that only that process sees. The test
reads the files through `/proc/<pid>/root`, the process's view of the filesystem. Redis must
live outside the tmpfs (pass --redis-url).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import ServerProcess, listening_url

# $1: tmpfs size, $2: mount point, then the command to run inside the new namespaces
_MOUNT_THEN_EXEC = 'mount -t tmpfs -o size="$1",mode=0700 tmpfs "$2" && shift 2 && exec "$@"'


def small_tmpfs_unavailable() -> str | None:
    """Why a size-limited tmpfs cannot be mounted here (None when it can)."""
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    with tempfile.TemporaryDirectory() as mount_point:
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", _MOUNT_THEN_EXEC, "sh", "1m", mount_point, "true"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a user namespace (unshare -rm): {probe.stderr.strip()}"
    return None


def seen_by(server: ServerProcess, path: Path) -> Path:
    """`path` as the server process sees it (through its mount namespace)."""
    return Path(f"/proc/{server.process.pid}/root") / path.resolve().relative_to("/")


@contextlib.contextmanager
def server_on_small_disk(data_dir: Path, size: str, *args: str) -> Iterator[ServerProcess]:
    """Run `tusserver` with `data_dir` on a tmpfs of `size` (e.g. "8m"); stopped on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"tusserver-tmpfs-{time.monotonic_ns()}.log"
    command = [
        "unshare", "-rm", "sh", "-c", _MOUNT_THEN_EXEC, "sh", size, str(data_dir),
        sys.executable, "-m", "tusserver", "--host", "127.0.0.1", "--port", "0",
        "--data-dir", str(data_dir), *args,
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield ServerProcess(process, listening_url(process, log_path), data_dir, log_path)
    finally:
        # the embedded Valkey tusserver started (without --redis-url) outlives a SIGKILL of
        # it: its pid, read while the tmpfs can still be seen (the pid namespace is ours)
        valkey = _valkey_of(process.pid, data_dir)
        # unshare and sh exec'd into tusserver: this pid is the server itself
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if valkey is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(valkey, signal.SIGKILL)


def _valkey_of(server_pid: int, data_dir: Path) -> int | None:
    """The pid of the embedded Valkey in `data_dir` as the server at `server_pid` sees it,
    if one runs."""
    pidfile = Path(f"/proc/{server_pid}/root") / data_dir.resolve().relative_to("/")
    try:
        pid = int((pidfile / "redis" / "valkey.pid").read_text())
        name = Path(f"/proc/{pid}/comm").read_text()
    except (OSError, ValueError):
        return None
    return pid if "valkey" in name or "redis" in name else None
