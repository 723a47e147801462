"""The system calls that put bytes on the disk and make them durable, shared by the file
operations (`storage.py`) and the receiving threads (`receive.py`). Each runs in the
calling (worker) thread; nothing here knows about uploads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from tusserver.errors import StorageFailure

PIECE_BYTES = 256 * 2**10  # one pwrite (measured on the project's VM, see write_all)
COPY_BLOCK_BYTES = 4 * 2**20

_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_sync_file_range = _load_sync_file_range()


def start_writeback(fd: int, offset: int, size: int) -> None:
    """Ask the kernel to start writing a block just written to the disk, without waiting
    for it: under --fsync always every commit fdatasyncs the file, and then finds less left
    to write (the fdatasync stalls the transfer less). Best effort: an error changes nothing
    the fdatasync does not redo."""
    if _sync_file_range is not None:
        _sync_file_range(fd, offset, size, _SYNC_FILE_RANGE_WRITE)


def sync(fd: int) -> None:
    """Make the file's written bytes durable (fdatasync where the OS has it)."""
    getattr(os, "fdatasync", os.fsync)(fd)


def fsync_folder(folder: Path) -> None:
    """Make the entries of `folder` (a new file or folder in it) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, chunks: Sequence[bytes | memoryview], offset: int, size: int) -> None:
    """Write the chunks back to back from `offset`, in pieces of at most PIECE_BYTES.
    (Measured on the project's VM: page-cache writes of 1 MiB or more cost several times the
    kernel CPU of the same bytes in 256 KiB writes; the thread hop per gathered block is what
    the gathering saves.)"""
    position = offset
    for chunk in chunks:
        view = memoryview(chunk)
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done : done + PIECE_BYTES], position + done)
        position += len(view)
    if position - offset != size:
        raise StorageFailure("the server lost count of the bytes it wrote")


def copy_range(source_fd: int, target_fd: int, length: int, target_offset: int) -> None:
    """Copy `length` bytes from the start of `source_fd` to `target_offset` of `target_fd`."""
    copied = 0
    copy_file_range = getattr(os, "copy_file_range", None)
    while copy_file_range is not None and copied < length:
        try:
            done = copy_file_range(
                source_fd, target_fd, length - copied, copied, target_offset + copied
            )
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            break  # this filesystem pair cannot: copy through a bounded buffer
        if done == 0:
            raise StorageFailure("a partial upload's file is shorter than its length")
        copied += done
    while copied < length:
        block = os.pread(source_fd, min(COPY_BLOCK_BYTES, length - copied), copied)
        if not block:
            raise StorageFailure("a partial upload's file is shorter than its length")
        os.pwrite(target_fd, block, target_offset + copied)
        copied += len(block)


# How much less CPU the bulk threads (hashing and writing blocks) get than the event loop when
# the cores are all busy: a resuming client's HEAD + 4 KiB PATCH under 32 concurrent uploads
# waits for the loop, which waited in the run queue behind them (scenario f, 2 cores: p99
# 231-271 ms at equal priority, 115-197 at +10; c gave up to 15%: benchmarks/README.md).
BULK_NICENESS = 10


def lower_thread_priority() -> None:
    """Make the calling thread `BULK_NICENESS` nicer than it is (up to 19); as a thread
    pool's initializer, each of its threads. Linux only: elsewhere the niceness is the
    process's, and the loop's own would drop with it."""
    if sys.platform != "linux":
        return
    thread = threading.get_native_id()
    with contextlib.suppress(OSError):
        nice = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, nice + BULK_NICENESS))
