"""The local side of `tusserver upload`: which files to send, and the resume state file.

Files are named by the paths given on the command line; a folder is walked recursively and
every file in it keeps its path below the folder's parent (`photos/2024/a.jpg`), which goes
to the server as the `relativePath` metadata. The resume state maps a key made of the
endpoint, the file's absolute path, size, mtime and a content fingerprint to the upload URL
the server gave out, and whether that upload finished. It is one small JSON file, written
whole through a temporary file and a rename, under an advisory lock, so a crash, a second
uploader or Ctrl-C never leaves it half written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

FINGERPRINT_BLOCK_BYTES = 64 * 1024
STATE_VERSION = 1
DONE_KEPT_S = 30 * 86400.0  # finished entries older than this are dropped from the state file


@dataclass(frozen=True)
class LocalFile:
    """One regular file to upload, as it was when it was found."""

    path: Path  # absolute
    relative_path: str  # with "/" separators, starting with the given folder's own name
    size: int
    mtime_ns: int

    @property
    def name(self) -> str:
        return self.path.name


def find_files(arguments: Sequence[str]) -> tuple[list[LocalFile], list[str]]:
    """The files named by `arguments` (folders walked recursively, sorted, each file once)
    and one problem line for each argument that is neither a file nor a folder."""
    found: dict[Path, LocalFile] = {}
    problems: list[str] = []
    for argument in arguments:
        given = Path(argument)
        try:
            mode = given.stat().st_mode
        except OSError as error:
            problems.append(f"{argument}: {error.strerror or error}")
            continue
        if stat.S_ISDIR(mode):
            top = given.resolve()
            for file in _walk(top, top.name):
                found.setdefault(file.path, file)
        elif stat.S_ISREG(mode):
            single = _local_file(given.resolve(), given.resolve().name)
            if single is not None:
                found.setdefault(single.path, single)
        else:
            problems.append(f"{argument}: not a regular file or a folder")
    return list(found.values()), problems


def _walk(top: Path, top_name: str) -> Iterator[LocalFile]:
    for folder, dirnames, filenames in os.walk(top):
        dirnames.sort()
        below = Path(folder).relative_to(top)
        for filename in sorted(filenames):
            relative = (Path(top_name) / below / filename).as_posix().lstrip("/")
            file = _local_file(Path(folder) / filename, relative)
            if file is not None:
                yield file


def _local_file(path: Path, relative_path: str) -> LocalFile | None:
    """A LocalFile for a regular file (symlinks followed); None for sockets, FIFOs, devices
    and files that vanished meanwhile."""
    try:
        info = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return LocalFile(path, relative_path, info.st_size, info.st_mtime_ns)


def fingerprint(file: LocalFile) -> str:
    """SHA-256 of the size, the first and the last 64 KiB: cheap for any size, and it tells
    apart two files that share path, size and mtime but not content (a restored backup)."""
    digest = hashlib.sha256(str(file.size).encode())
    with open(file.path, "rb") as stream:
        digest.update(stream.read(FINGERPRINT_BLOCK_BYTES))
        if file.size > FINGERPRINT_BLOCK_BYTES:
            stream.seek(max(FINGERPRINT_BLOCK_BYTES, file.size - FINGERPRINT_BLOCK_BYTES))
            digest.update(stream.read(FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()


def resume_key(endpoint: str, file: LocalFile) -> str:
    """The state file key of `file` for `endpoint`: a change of any part starts anew."""
    parts = [endpoint, str(file.path), file.size, file.mtime_ns, fingerprint(file)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def default_state_path() -> Path:
    """`$XDG_STATE_HOME/tusserver/uploads.json`, else `~/.local/state/tusserver/uploads.json`."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tusserver" / "uploads.json"


@dataclass(frozen=True)
class ResumeEntry:
    url: str
    path: str  # for a person reading the file; the key is what counts
    is_done: bool
    updated_at: float


class ResumeState:
    """The resume state file; every method reads the file fresh, so several uploader
    processes (and this one's threads) can share it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._thread_lock = threading.Lock()

    def get(self, key: str) -> ResumeEntry | None:
        with self._locked():
            raw = self._read().get(key)
        if not isinstance(raw, dict):
            return None
        url, path, done = raw.get("url"), raw.get("path", ""), raw.get("done")
        if not isinstance(url, str) or not isinstance(done, bool):
            return None
        return ResumeEntry(url, str(path), done, float(raw.get("updated", 0.0)))

    def put(self, key: str, url: str, path: Path, *, is_done: bool) -> None:
        entry = {"url": url, "path": str(path), "done": is_done, "updated": time.time()}
        self._change(key, entry)

    def remove(self, key: str) -> None:
        self._change(key, None)

    def _change(self, key: str, entry: dict[str, object] | None) -> None:
        with self._locked():
            entries = self._read()
            if entry is None:
                entries.pop(key, None)
            else:
                entries[key] = entry
            oldest_kept = time.time() - DONE_KEPT_S
            for stale in [k for k, v in entries.items() if _is_old_done(v, oldest_kept)]:
                del entries[stale]
            self._write(entries)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing releases the lock

    def _read(self) -> dict[str, object]:
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}  # unreadable: start afresh rather than refuse to upload
        uploads = document.get("uploads") if isinstance(document, dict) else None
        return dict(uploads) if isinstance(uploads, dict) else {}

    def _write(self, entries: dict[str, object]) -> None:
        document = {"version": STATE_VERSION, "uploads": entries}
        fd, temporary = tempfile.mkstemp(prefix=".uploads-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as stream:
                json.dump(document, stream, indent=1, sort_keys=True)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise


def _is_old_done(entry: object, oldest_kept: float) -> bool:
    if not isinstance(entry, dict) or entry.get("done") is not True:
        return False
    updated = entry.get("updated")
    return isinstance(updated, int | float) and updated < oldest_kept
