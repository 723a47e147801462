"""Bytes on disk: one file per upload under `<data-dir>/uploads/<ab>/<id>`.

Files are 0600 and folders 0700; a file's folder is fsynced when the file is created. Writes
are positional (`os.pwrite`) from a worker thread, which also feeds the running hashes, so one
thread hop serves a 1-4 MiB block. Nothing here knows about Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import re
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiofiles.os

from tusserver.errors import InsufficientStorage, StorageFailure
from tusserver.files import disk
from tusserver.files.receive import Receipt, Reception, receive_into
from tusserver.settings import FsyncPolicy

if TYPE_CHECKING:
    from hashlib import _Hash as Hash
else:
    Hash = Any

T = TypeVar("T")
HASH_BLOCK_BYTES = 4 * 2**20
HASH_BESIDE_BYTES = 2**20  # blocks this large are hashed in a second thread while written
BULK_THREADS = max(2, os.cpu_count() or 1)  # one block written and hashed per core at once
IO_THREADS = 32  # threads for the short file operations (mostly waiting for the disk)
# Bodies read straight from their sockets at once, per process (a thread each, mostly
# waiting in poll): past this many, a large body is read on the event loop like any other
# (--receive-threads).
RECEIVERS = 32
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_FAN_OUT = re.compile(r"[0-9a-f]{2}")
_UPLOAD_FILE = re.compile(r"[0-9a-f]{32}")  # the shape of an upload id: nothing else is ours


def _storage_error(error: OSError) -> InsufficientStorage | StorageFailure:
    if error.errno in _DISK_FULL:
        return InsufficientStorage("the disk is full; nothing past the last commit was kept")
    return StorageFailure(
        f"the server could not write the upload ({os.strerror(error.errno or 0)})"
    )


async def _in_thread(function: Callable[[], T], pool: Executor) -> T:
    """Run `function` in a worker thread of `pool`."""
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, function)
    except OSError as error:
        raise _storage_error(error) from error


class FileShorter(Exception):
    """The file holds fewer bytes than the committed offset (lost with the page cache after
    a crash under --fsync never or complete): the offset must move back to `size`."""

    def __init__(self, size: int) -> None:
        super().__init__(f"the file holds {size} bytes, fewer than its committed offset")
        self.size = size


class UploadFile:
    """An upload's file opened for writing at known offsets."""

    def __init__(self, fd: int, storage: Storage) -> None:
        self.fd = fd
        self._storage = storage

    async def write(
        self, offset: int, chunks: list[bytes], hashes: list[Hash], *, sync: bool = False,
        few: bool = False,
    ) -> None:  # fmt: skip
        """Write `chunks` back to back at `offset` and feed them to `hashes`, without joining
        them: for blocks of HASH_BESIDE_BYTES or more the write and the hashing run in two
        worker threads at once (both release the GIL), smaller ones in one thread hop. If the
        write fails, the hashes may hold bytes the file does not. With `sync`, the file is
        made durable (fdatasync) after the write, in the same thread. `few`: whether few
        bodies stream (`Storage.bulk_for`).

        Raises InsufficientStorage (507) when the disk is full or below --min-free-disk, and
        StorageFailure (500) for other write errors."""
        storage = self._storage
        size = sum(len(chunk) for chunk in chunks)

        def write() -> None:
            storage.check_free_space(size)
            disk.write_all(self.fd, chunks, offset, size)
            if sync:
                disk.sync(self.fd)
            else:  # under --fsync always the next commit syncs: have the disk start now
                storage.start_writeback(self.fd, offset, size)

        def digest() -> None:
            for running_hash in hashes:
                for chunk in chunks:
                    running_hash.update(chunk)

        pool = storage.bulk_for(few)
        if size < HASH_BESIDE_BYTES or not hashes:  # a second thread costs more than it saves

            def write_and_digest() -> None:
                write()
                digest()

            await _in_thread(write_and_digest, pool)
            return
        written, hashed = await asyncio.gather(
            _in_thread(write, pool), _in_thread(digest, pool),
            return_exceptions=True,
        )  # fmt: skip
        for outcome in (written, hashed):
            if isinstance(outcome, BaseException):
                raise outcome

    async def receive(
        self, sock_fd: int, buffered: list[bytes], remaining: int, offset: int,
        how: Reception,
    ) -> Receipt:  # fmt: skip
        """Write `buffered`, then the next `remaining` bytes of the socket `sock_fd` (ours to
        close), into the file from `offset`, in a receiving thread of its own
        (`receive.receive_into` says what is reported and raised). The thread works on its
        own duplicate of this file, so it may outlive an awaiting task that is cancelled
        without touching a closed descriptor."""
        file_fd = os.dup(self.fd)

        def receive() -> Receipt:
            return receive_into(how, sock_fd, file_fd, offset, buffered, remaining)

        return await _in_thread(receive, self._storage.receiving)

    async def truncate(self, size: int) -> None:
        """Cut the file back to `size` bytes (throwing away bytes that were not committed)."""
        await _in_thread(lambda: os.ftruncate(self.fd, size), self._storage.io)

    async def sync(self) -> None:
        """Make the written bytes durable (fdatasync where the OS has it)."""
        await _in_thread(lambda: disk.sync(self.fd), self._storage.io)

    async def close(self) -> None:
        await _in_thread(lambda: os.close(self.fd), self._storage.io)


class Storage:
    """The upload files under one data directory."""

    def __init__(
        self, data_dir: Path, *, fsync: FsyncPolicy, min_free_disk_bytes: int,
        receivers: int = RECEIVERS,
    ) -> None:  # fmt: skip
        self.data_dir = data_dir.resolve()
        self.root = self.data_dir / "uploads"
        self.fsync = fsync
        self.min_free_disk_bytes = min_free_disk_bytes
        # Bulk work (every block of a streamed body, whole-file hashes and copies) has threads
        # of its own, so opening, closing, syncs and small bodies never queue behind it: under
        # 16 streams per process a resuming client's small PATCH waited ~100 ms at p50 for a
        # default-executor thread while streamed blocks of under a MiB filled them
        # (benchmarks/README.md, scenario f).
        # They run nicer than the event loop, which answers every small request: hashing is
        # most of a body's CPU, and it can wait (disk.lower_thread_priority).
        self.bulk = ThreadPoolExecutor(
            BULK_THREADS, "tus-bulk", initializer=disk.lower_thread_priority
        )
        # The same work for a body that streams with few others (`bulk_for`), at the loop's
        # priority: with no crowd to answer, a niced hash only waits while the loop and the
        # client hold both cores, and the body's end then waits for it.
        self.bulk_few = ThreadPoolExecutor(BULK_THREADS, "tus-bulk-few")
        # Everything else: opening, creating (with the folder's fsync), syncing, closing and
        # small bodies. Mostly waiting for the disk, so many threads: under a disk busy with
        # uploads a creation's fsync can take a second, and a resuming client's small PATCH
        # must not queue behind a few of them (the loop's default executor has 6 on 2 cores).
        self.io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="tus-io")
        # Large bodies read off the event loop, one thread each while it lasts.
        self.receivers = receivers
        self.receiving = ThreadPoolExecutor(max(1, receivers), thread_name_prefix="tus-recv")
        # Under --fsync always, each such body's syncs (one at a time per body, beside its
        # reading), so they never hold the threads a small request needs.
        self.receive_syncs = ThreadPoolExecutor(max(1, receivers), thread_name_prefix="tus-rsync")
        self.receivers_busy = 0

    def bulk_for(self, few: bool) -> Executor:
        """Where a streamed body's blocks are written and hashed: at the loop's priority
        while `few` bodies stream, else nicer than the loop (so a crowd's hashing never
        delays the answers to small requests)."""
        return self.bulk_few if few else self.bulk

    def take_receiver(self) -> bool:
        """Reserve a receiving thread for a body read off the event loop (`UploadFile.receive`);
        False when all `receivers` are busy (the body is then read on the loop). Every True
        is followed by `free_receiver` once the receive has ended."""
        if self.receivers_busy >= self.receivers:
            return False
        self.receivers_busy += 1
        return True

    def free_receiver(self) -> None:
        self.receivers_busy -= 1

    def start_writeback(self, fd: int, offset: int, size: int) -> None:
        """Under --fsync always, have the disk start writing a range just written."""
        if self.fsync == "always":
            disk.start_writeback(fd, offset, size)

    def must_sync(self, *, completes: bool) -> bool:
        """Whether written bytes are fsynced before they are committed, per --fsync: always,
        or only for the commit that completes the upload (`complete`), or never."""
        return self.fsync == "always" or (completes and self.fsync != "never")

    def close(self) -> None:
        """Let the threads end once their work is done."""
        for pool in (self.bulk, self.bulk_few, self.receiving, self.receive_syncs, self.io):
            pool.shutdown(wait=False)

    def prepare(self) -> None:
        """Create the data folders (0700). Called once at start."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)

    def relative_path(self, upload_id: str) -> str:
        """Where the file lies inside the data directory (ids are hex, so never `..`)."""
        return f"uploads/{upload_id[:2]}/{upload_id}"

    def path_of(self, upload_id: str) -> Path:
        return self.data_dir / self.relative_path(upload_id)

    def check_free_space(self, wanted_bytes: int) -> None:
        """Raise InsufficientStorage (507) if writing `wanted_bytes` would leave less than
        --min-free-disk free. Cheap (one statvfs); skipped when no minimum is set."""
        if self.min_free_disk_bytes <= 0:
            return
        stats = os.statvfs(self.root)
        if stats.f_bavail * stats.f_frsize - wanted_bytes < self.min_free_disk_bytes:
            raise InsufficientStorage("the server is low on disk space; try again later")

    async def readiness(self) -> dict[str, str]:
        """Whether files can be written: `data_dir` (a probe file is created, written and
        removed) and `free_disk` (more than --min-free-disk free), each "ok" or why not."""

        def probe() -> dict[str, str]:
            checks = {"data_dir": "ok", "free_disk": "ok"}
            probe_path = self.data_dir / f".ready-{os.getpid()}"
            try:
                fd = os.open(probe_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, b"ready")
                finally:
                    os.close(fd)
                    probe_path.unlink(missing_ok=True)
            except OSError as error:
                checks["data_dir"] = f"not writable: {error.strerror or error}"
            try:
                stats = os.statvfs(self.data_dir)
            except OSError as error:
                checks["free_disk"] = f"unknown: {error.strerror or error}"
                return checks
            free_bytes = stats.f_bavail * stats.f_frsize
            if free_bytes <= self.min_free_disk_bytes:
                checks["free_disk"] = (
                    f"{free_bytes} bytes free, --min-free-disk is {self.min_free_disk_bytes}"
                )
            return checks

        return await _in_thread(probe, self.io)

    async def create(self, upload_id: str) -> None:
        """Create the upload's empty file (0600) and make its directory entry durable."""
        await _in_thread(lambda: os.close(self._create(upload_id)), self.io)

    async def create_for_append(self, upload_id: str) -> UploadFile:
        """`create`, and keep the new file open for writing from offset 0 (one thread hop)."""
        return UploadFile(await _in_thread(lambda: self._create(upload_id), self.io), self)

    async def create_holding(self, upload_id: str, data: bytes, *, sync: bool) -> None:
        """Create the upload's file holding `data` (and with `sync`, make the bytes durable)
        in one thread hop. A failed write leaves no file behind. Raises InsufficientStorage
        (507) and StorageFailure (500) as `UploadFile.write` does."""

        def create() -> None:
            self.check_free_space(len(data))
            fd = self._create(upload_id)
            try:
                disk.write_all(fd, [data], 0, len(data))
                if sync:
                    disk.sync(fd)
            except BaseException:
                os.close(fd)
                self.path_of(upload_id).unlink(missing_ok=True)
                raise
            os.close(fd)

        await _in_thread(create, self.io)

    def _create(self, upload_id: str) -> int:
        path = self.path_of(upload_id)
        self.check_free_space(0)
        flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
        folders = [path.parent]
        try:
            fd = os.open(path, flags, 0o600)
        except FileNotFoundError:  # the first upload of its fan-out folder
            path.parent.mkdir(mode=0o700, exist_ok=True)
            folders.append(self.root)
            fd = os.open(path, flags, 0o600)
        try:
            if self.fsync != "never":
                for folder in folders:
                    disk.fsync_folder(folder)
        except BaseException:
            os.close(fd)
            raise
        return fd

    async def open_for_append(
        self, upload_id: str, committed_offset: int
    ) -> tuple[UploadFile, int]:
        """Open the file to append at the committed offset; cut off bytes past it (left by a
        crash or an uncommitted request). Returns the file and the offset writing starts at:
        the file's size if it is shorter than the committed offset (bytes lost with the page
        cache), so the caller moves the offset back instead of leaving a hole."""
        fd, start = await _in_thread(lambda: self._open_at(upload_id, committed_offset), self.io)
        return UploadFile(fd, self), start

    async def append_holding(
        self, upload_id: str, committed_offset: int, data: bytes, hashes: list[Hash],
        *, sync: bool,
    ) -> None:  # fmt: skip
        """`open_for_append`, write `data` at the committed offset, feed it to `hashes`, make
        it durable with `sync` and close the file, all in one thread hop (for a small body).
        Raises FileShorter, writing nothing, if the file is shorter than the offset; on a
        failed write (InsufficientStorage, StorageFailure, as `UploadFile.write`) the file is
        cut back to the offset."""

        def append() -> None:
            self.check_free_space(len(data))
            fd, size = self._open_at(upload_id, committed_offset)
            try:
                if size < committed_offset:
                    raise FileShorter(size)
                try:
                    disk.write_all(fd, [data], committed_offset, len(data))
                    if sync:
                        disk.sync(fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, committed_offset)
                    raise
                for running_hash in hashes:
                    running_hash.update(data)
            finally:
                os.close(fd)

        await _in_thread(append, self.io)

    def _open_at(self, upload_id: str, committed_offset: int) -> tuple[int, int]:
        """Open the file for writing, cut off bytes past `committed_offset`; fd and size."""
        path = self.path_of(upload_id)
        try:
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # its folder is gone too (removed by hand)
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            size = os.fstat(fd).st_size
            if size > committed_offset:
                os.ftruncate(fd, committed_offset)
                size = committed_offset
        except BaseException:
            os.close(fd)
            raise
        return fd, size

    async def files_older_than(self, before: float) -> list[str]:
        """The names (upload ids) of upload files (regular files named like an upload id)
        last changed before `before` (unix time), read off the event loop; a file that
        vanishes meanwhile is left out."""

        def scan() -> list[str]:
            names = []
            for folder in os.scandir(self.root):
                if not (folder.is_dir(follow_symlinks=False) and _FAN_OUT.fullmatch(folder.name)):
                    continue
                for entry in os.scandir(folder.path):
                    is_ours = _UPLOAD_FILE.fullmatch(entry.name)
                    if not (is_ours and entry.is_file(follow_symlinks=False)):
                        continue
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime < before:
                            names.append(entry.name)
                    except FileNotFoundError:
                        continue
            return names

        return await _in_thread(scan, self.bulk)

    async def delete(self, upload_id: str) -> None:
        """Remove the upload's file; a file already gone is fine."""
        try:
            await aiofiles.os.remove(self.path_of(upload_id))
        except FileNotFoundError:
            pass

    async def concatenate(self, final_id: str, parts: list[tuple[str, int]]) -> None:
        """Write the first `length` bytes of each part, in order, into the new file of
        `final_id`, without passing them through Python memory where the OS can
        (copy_file_range; a bounded-buffer copy where it cannot). Durable per --fsync."""
        await self.create(final_id)
        target_path = self.path_of(final_id)
        sources = [(self.path_of(part_id), length) for part_id, length in parts]
        durable = self.fsync != "never"

        def copy() -> None:
            self.check_free_space(sum(length for _, length in sources))
            with open(target_path, "r+b", buffering=0) as target:
                position = 0
                for source_path, length in sources:
                    with open(source_path, "rb", buffering=0) as source:
                        disk.copy_range(source.fileno(), target.fileno(), length, position)
                    position += length
                if durable:
                    os.fsync(target.fileno())

        await _in_thread(copy, self.bulk)

    async def sha256(self, upload_id: str, length: int) -> str:
        """The hex SHA-256 of the file's first `length` bytes, read in bounded blocks off the
        event loop."""
        path = self.path_of(upload_id)

        def digest() -> str:
            running = hashlib.sha256()
            remaining = length
            with open(path, "rb", buffering=0) as file:
                while remaining > 0:
                    block = file.read(min(HASH_BLOCK_BYTES, remaining))
                    if not block:
                        raise StorageFailure("the upload's file is shorter than its length")
                    running.update(block)
                    remaining -= len(block)
            return running.hexdigest()

        return await _in_thread(digest, self.bulk)
