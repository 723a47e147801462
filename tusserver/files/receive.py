"""A large request body moved from its socket to its file by one worker thread.

The event loop reads a body chunk by chunk: each chunk is a loop turn, a parser pass and a
new bytes object, and 16 fast bodies in one process keep the loop so busy that a small
request waits for it. A body of a known, large size is instead read here, straight from
the socket into two reused buffers: while one block is hashed (in a bulk thread), the next
is read and written at its offset (`disk.write_all`, pieces of 256 KiB). A block starts at
512 KiB and, on a long body, doubles up to what `Reception.block_bytes` allows (4 MiB while
few bodies arrive in the process, 512 KiB otherwise). The threads hold the GIL only between
those calls; the event loop is left with the commits.

Nothing here knows about HTTP or Redis: the caller hands over the socket (a duplicate of its
descriptor, which this closes), what had already been received, and a stop flag.
"""

from __future__ import annotations

import mmap
import os
import select
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tusserver.files import disk

if TYPE_CHECKING:
    from hashlib import _Hash as Hash
else:
    Hash = Any

# A body's first two blocks, and every block while many bodies arrive at once (512 KiB kept a
# worker of 32 concurrent 64 MiB uploads at 74-77 MiB at its peak, against 91-101 MiB with
# 1 MiB: benchmarks/README.md, issue 24).
BLOCK_BYTES = 512 * 2**10
# A buffer grows only while the body has this many times the new size left (so bodies of
# 64 MiB or less never grow): 16 MiB PATCHes moved 15% less when their buffers grew (new
# pages, faulted in and zeroed, per body), and at 32 times c's 64 MiB bodies grew and shrank
# with the crowd, c moving about 4% less.
GROWTH_RUNWAY = 64
WRITEBACK_BYTES = 4 * 2**20  # under --fsync always: start the disk writing this often
POLL_MS = 100  # how long a stop request or the idle deadline may go unnoticed

# Why the body stopped: all of it arrived, the caller asked to stop, nothing arrived for the
# idle time, or the client closed the connection (or it broke).
Ending = Literal["done", "stopped", "idle", "hung up"]
# Told an end of the file: every byte before it written (from the receiving thread), or
# durable (from the sync thread, never past an end already told as written).
Progress = Callable[[int], None]


@dataclass(frozen=True)
class Receipt:
    ending: Ending
    end: int  # the file's end: every byte before it written and hashed


@dataclass(frozen=True)
class Reception:
    """What one body's thread needs besides its descriptors."""

    # 507 (InsufficientStorage) when writing this many bytes would leave too little free
    check_free_space: Callable[[int], None]
    # (fd, offset, size): have the disk start writing a range just written, per --fsync
    start_writeback: Callable[[int, int, int], None]
    # How large the next block may be, read before each; two are held at once
    # (`uploads.body.BodyMemory.receive_block_bytes`).
    block_bytes: Callable[[], int]
    # Where the next block is hashed while the one after is read, asked before each
    # (`files.storage.Storage.bulk_for`).
    hasher: Callable[[], Executor]
    syncer: Executor  # where the file is made durable while the next blocks arrive
    hashes: list[Hash]
    stop: threading.Event
    idle_s: float
    # > 0: make the file durable this often while the body arrives (and after a pause in
    # it), reporting it; 0: never here. One sync at a time, beside the reading.
    sync_every_s: float
    on_written: Progress
    on_durable: Progress


def receive_into(
    how: Reception, sock_fd: int, file_fd: int, offset: int, buffered: list[bytes], remaining: int
) -> Receipt:
    """Write `buffered`, then the next `remaining` bytes of the socket, at `offset` of the file
    and feed them to the hashes. The end is told after each block (`on_written`), and after
    each sync (`on_durable`), but never for the body's last block, so
    a commit made beside this never completes the upload: the caller learns the end from the
    receipt, once every byte before it is hashed. Closes `sock_fd` and `file_fd` (duplicates)
    at the end. OSError from the file (disk full, I/O error) is raised; one from the socket
    ends the body ("hung up")."""
    try:
        end = offset
        if buffered:  # what had arrived, and the next writeback's worth, must fit
            first = sum(len(chunk) for chunk in buffered) + min(remaining, WRITEBACK_BYTES)
            how.check_free_space(first)
        for chunk in buffered:
            disk.write_all(file_fd, [chunk], end, len(chunk))
            _feed(how.hashes, memoryview(chunk))
            end += len(chunk)
        return _Pump(how, sock_fd, file_fd, end).run(remaining)
    finally:
        os.close(sock_fd)
        os.close(file_fd)


class _Pump:
    """Blocks from the socket to the file, each hashed while the next one is read."""

    def __init__(self, how: Reception, sock_fd: int, file_fd: int, end: int) -> None:
        self.how = how
        self.sock_fd = sock_fd
        self.file_fd = file_fd
        self.end = end  # written (its hashing may still run)
        self.sync_mark = end  # the end the last sync started covers
        self.syncing: Future[None] | None = None
        self.poller = select.poll()
        self.poller.register(sock_fd, select.POLLIN)
        self.heard_at = self.synced_at = time.monotonic()
        self.unwritten_back = 0  # written since the last start of writeback

    def run(self, remaining: int) -> Receipt:
        buffers: list[memoryview] = [memoryview(b""), memoryview(b"")]
        hashing: Future[None] | None = None
        turn = 0
        try:
            while remaining > 0:
                # this buffer's hash has ended: it may be replaced by one of another size
                size = _buffer_size(len(buffers[turn]), self.how.block_bytes(), remaining)
                if size != len(buffers[turn]):
                    buffers[turn] = _buffer(size)
                block = buffers[turn][: min(size, remaining)]
                filled = self._fill(block)
                if isinstance(filled, str):
                    return Receipt(filled, self.end)
                self._write_block(block[:filled], remaining)
                if hashing is not None:  # the other buffer's hash, before it is refilled
                    hashing.result()
                hashing = self.how.hasher().submit(_feed, self.how.hashes, block[:filled])
                self.end += filled
                remaining -= filled
                turn = 1 - turn
                if remaining:
                    self._report()
            return Receipt("done", self.end)
        finally:
            if hashing is not None:
                hashing.result()  # every byte before `end` is hashed when this returns
            if self.syncing is not None:
                self.syncing.result()  # its descriptor is closed next; a failed sync raises

    def _fill(self, block: memoryview) -> int | Ending:
        """Read into `block` what has arrived (waiting for the first byte): its size, or why
        the body ended before any."""
        how, filled = self.how, 0
        while filled < len(block):
            if how.stop.is_set():
                return filled or "stopped"  # what was read is written first: it arrived
            try:
                size = os.readv(self.sock_fd, [block[filled:]])
            except BlockingIOError:
                if filled:
                    break  # write what came; the rest is read beside its hashing
                if self.poller.poll(POLL_MS):
                    continue
                now = time.monotonic()
                if now - self.heard_at > how.idle_s:
                    return "idle"
                if how.sync_every_s and self.end > self.sync_mark:
                    if now - self.synced_at >= how.sync_every_s:  # a pause: make it durable
                        self._start_sync()
                continue
            except OSError:  # reset by the peer, or another failure of the connection
                return filled or "hung up"
            if size == 0:
                return filled or "hung up"
            filled += size
            self.heard_at = time.monotonic()
        return filled

    def _write_block(self, data: memoryview, remaining: int) -> None:
        how = self.how
        if self.unwritten_back == 0:  # the next writeback's worth of the body must fit
            how.check_free_space(min(remaining, WRITEBACK_BYTES))
        disk.write_all(self.file_fd, [data], self.end, len(data))
        self.unwritten_back += len(data)
        if self.unwritten_back >= WRITEBACK_BYTES:
            end = self.end + len(data)
            how.start_writeback(self.file_fd, end - self.unwritten_back, self.unwritten_back)
            self.unwritten_back = 0

    def _report(self) -> None:
        """Tell the caller the new end, and start making it durable once per
        `sync_every_s`."""
        how = self.how
        how.on_written(self.end)
        if how.sync_every_s and self.heard_at - self.synced_at >= how.sync_every_s:
            self._start_sync()

    def _start_sync(self) -> None:
        """Make every byte before the current end durable in a sync thread, while this one
        reads on. While a sync runs no other starts (the next is due once it has ended), so
        what is reported durable lags by the sync in flight; the body itself waits only
        for the kernel's limit on dirty pages, and at its end for that sync. A failed sync
        raises here or at the end of the body: a later fdatasync of the file may not report
        the error again."""
        if self.syncing is not None:
            if not self.syncing.done():
                return
            self.syncing.result()
        mark, self.sync_mark, self.synced_at = self.end, self.end, time.monotonic()

        def sync() -> None:
            disk.sync(self.file_fd)
            self.how.on_durable(mark)

        self.syncing = self.how.syncer.submit(sync)


def _buffer_size(current: int, allowed: int, remaining: int) -> int:
    """The size of a body's buffer for its next block, now `current` (0: none yet): first
    BLOCK_BYTES, then twice its size while `allowed` has room and the body has at least
    GROWTH_RUNWAY times that size left to read (a larger buffer's new pages cost page faults
    that only a long body earns back), and `allowed` when that has fallen below it."""
    if current == 0:
        return max(1, min(BLOCK_BYTES, remaining))
    grown = 2 * current
    if grown <= allowed and remaining >= GROWTH_RUNWAY * grown:
        return grown
    return min(current, max(allowed, BLOCK_BYTES))


def _buffer(size: int) -> memoryview:
    """A buffer for blocks of `size`. Those of BLOCK_BYTES or less come from the C allocator,
    which hands the same memory to the next body. Larger ones are anonymous private mmaps,
    handed back to the kernel when dropped: from the C allocator, buffers of changing sizes
    in 32 receiving threads (each with its own malloc arena) left a worker of c at 141-168 MiB
    instead of 80-89."""
    if size <= BLOCK_BYTES:
        return memoryview(bytearray(size))
    return memoryview(mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


def _feed(hashes: list[Hash], data: memoryview) -> None:
    for running_hash in hashes:
        running_hash.update(data)
