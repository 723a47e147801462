"""The local side of `tusserver upload`: which files to send, and the resume state file.

Files are named by the paths given on the command line; a folder is walked recursively and
every file in it keeps its path below the folder's parent (`photos/2024/a.jpg`), shown on
screen, and its path inside the folder (`2024/a.jpg`), which goes to the server as the
`relativePath` of its batch (a plain upload sends the first). The resume state maps a key
made of the endpoint, the file's absolute path, size, mtime, a content fingerprint and its
batch to the upload URL the server gave out, and whether that upload finished; and a key of
each folder's files to the batch opened for them. It is one small JSON file, written whole
through a temporary file and a rename, under an advisory lock, so a crash, a second uploader
or Ctrl-C never leaves it half written.
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
UPLOADS, BATCHES = "uploads", "batches"  # the state file's sections
DONE_KEPT_S = 30 * 86400.0  # finished entries older than this are dropped from the state file


@dataclass(frozen=True)
class LocalFile:
    """One regular file to upload, as it was when it was found."""

    path: Path  # absolute
    relative_path: str  # with "/" separators, starting with the given folder's own name
    size: int
    mtime_ns: int
    folder: Path | None = None  # the given folder it was found in (absolute), if any
    path_in_folder: str = ""  # with "/" separators, below `folder`; "" without one

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
            inside = (below / filename).as_posix()
            relative = (Path(top_name) / below / filename).as_posix().lstrip("/")
            file = _local_file(Path(folder) / filename, relative, top, inside)
            if file is not None:
                yield file


def _local_file(
    path: Path, relative_path: str, folder: Path | None = None, path_in_folder: str = ""
) -> LocalFile | None:
    """A LocalFile for a regular file (symlinks followed); None for sockets, FIFOs, devices
    and files that vanished meanwhile."""
    try:
        info = path.stat()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):
        return None
    return LocalFile(path, relative_path, info.st_size, info.st_mtime_ns, folder, path_in_folder)


def files_by_folder(files: Sequence[LocalFile]) -> dict[Path, list[LocalFile]]:
    """The files found in folders, grouped by the given folder they were found in, in the
    order of `files` (files named by themselves are left out)."""
    folders: dict[Path, list[LocalFile]] = {}
    for file in files:
        if file.folder is not None:
            folders.setdefault(file.folder, []).append(file)
    return folders


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


def resume_key(endpoint: str, file: LocalFile, batch: str | None = None) -> str:
    """The state file key of `file` for `endpoint` (and the batch it is sent in): a change of
    any part starts anew, so a file sent in one batch is sent again in another."""
    parts: list[object] = [endpoint, str(file.path), file.size, file.mtime_ns, fingerprint(file)]
    if batch is not None:
        parts.append(batch)
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def folder_key(endpoint: str, folder: Path, files: Sequence[LocalFile]) -> str:
    """The state file key of the batch of `folder`'s `files` for `endpoint`: a file added,
    removed or changed makes another key, and so a new batch."""
    keys = sorted(resume_key(endpoint, file) for file in files)
    parts = [endpoint, "folder", str(folder), keys]
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


@dataclass(frozen=True)
class StoredBatch:
    """The batch a folder's files are sent in, as the server named it."""

    batch_id: str
    url: str


class ResumeState:
    """The resume state file; every method reads the file fresh, so several uploader
    processes (and this one's threads) can share it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock_path = path.with_name(path.name + ".lock")
        self._thread_lock = threading.Lock()

    def get(self, key: str) -> ResumeEntry | None:
        with self._locked():
            raw = self._read()[UPLOADS].get(key)
        if not isinstance(raw, dict):
            return None
        url, path, done = raw.get("url"), raw.get("path", ""), raw.get("done")
        if not isinstance(url, str) or not isinstance(done, bool):
            return None
        return ResumeEntry(url, str(path), done, float(raw.get("updated", 0.0)))

    def put(self, key: str, url: str, path: Path, *, is_done: bool) -> None:
        entry = {"url": url, "path": str(path), "done": is_done, "updated": time.time()}
        self._change(UPLOADS, key, entry)

    def remove(self, key: str) -> None:
        self._change(UPLOADS, key, None)

    def get_batch(self, key: str) -> StoredBatch | None:
        """The batch stored for a folder's key (folder_key), if any."""
        with self._locked():
            raw = self._read()[BATCHES].get(key)
        if not isinstance(raw, dict):
            return None
        batch_id, url = raw.get("id"), raw.get("url")
        if not isinstance(batch_id, str) or not isinstance(url, str):
            return None
        return StoredBatch(batch_id, url)

    def put_batch(self, key: str, batch: StoredBatch, folder: Path) -> None:
        entry = {"id": batch.batch_id, "url": batch.url, "path": str(folder),
                 "updated": time.time()}  # fmt: skip
        self._change(BATCHES, key, entry)

    def remove_batch(self, key: str) -> None:
        self._change(BATCHES, key, None)

    def _change(self, section: str, key: str, entry: dict[str, object] | None) -> None:
        with self._locked():
            document = self._read()
            entries = document[section]
            if entry is None:
                entries.pop(key, None)
            else:
                entries[key] = entry
            oldest_kept = time.time() - DONE_KEPT_S
            uploads, batches = document[UPLOADS], document[BATCHES]
            for stale in [k for k, v in uploads.items() if _is_old_done(v, oldest_kept)]:
                del uploads[stale]
            for stale in [k for k, v in batches.items() if _is_old(v, oldest_kept)]:
                del batches[stale]
            self._write(document)

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

    def _read(self) -> dict[str, dict[str, object]]:
        """The file's sections (uploads, batches), each empty if absent."""
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing or unreadable: start afresh, do not refuse
            document = {}
        if not isinstance(document, dict):
            document = {}
        sections: dict[str, dict[str, object]] = {}
        for section in (UPLOADS, BATCHES):
            entries = document.get(section)
            sections[section] = dict(entries) if isinstance(entries, dict) else {}
        return sections

    def _write(self, sections: dict[str, dict[str, object]]) -> None:
        document = {"version": STATE_VERSION, **sections}
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
    return isinstance(entry, dict) and entry.get("done") is True and _is_old(entry, oldest_kept)


def _is_old(entry: object, oldest_kept: float) -> bool:
    updated = entry.get("updated") if isinstance(entry, dict) else None
    return isinstance(updated, int | float) and updated < oldest_kept
