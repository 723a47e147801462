"""Under --fsync always, a body read in a thread (`files/receive.py`) is made durable once
a second by a sync that runs beside the reading: the body goes on arriving while the disk
catches up, an end is reported durable only once an fdatasync begun after it was written has
returned, the body's end waits for the sync in flight, and a sync that fails fails the body.

The bodies come over a real socket pair and go to real files; the syncs are real
fdatasyncs, run by an executor that can hold them back before they begin.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tusserver.files import disk
from tusserver.files.receive import BLOCK_BYTES, Receipt, Reception, receive_into

MiB = 2**20
WAIT_S = 30.0


class HeldExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs what it is given only once `release` is set, counting what it was given."""

    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="held-sync")
        self.release = threading.Event()
        self.submitted = 0

    def submit(  # type: ignore[override]
        self, fn: Callable[[], None], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[None]:
        self.submitted += 1

        def held() -> None:
            assert self.release.wait(WAIT_S), "the test never released the sync"
            fn()

        return super().submit(held)


class Reports:
    """What the receiving threads told: (end, durable) in order, waitable."""

    def __init__(self) -> None:
        self.told: list[tuple[int, bool]] = []
        self.changed = threading.Condition()

    def tell(self, end: int, durable: bool) -> None:
        with self.changed:
            self.told.append((end, durable))
            self.changed.notify_all()

    def on_written(self, end: int) -> None:
        self.tell(end, False)

    def on_durable(self, end: int) -> None:
        self.tell(end, True)

    def written(self) -> int:
        return max((end for end, durable in self.told if not durable), default=0)

    def durable(self) -> list[int]:
        return [end for end, durable in self.told if durable]

    def wait_written(self, end: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.written() >= end, WAIT_S), self.told


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    sender, receiver = socket.socketpair()
    receiver.setblocking(False)
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


def reception(
    syncer: concurrent.futures.Executor, reports: Reports, hashes: list[Any]
) -> Reception:
    hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-hash")
    return Reception(
        check_free_space=lambda size: None, start_writeback=disk.start_writeback,
        block_bytes=lambda: BLOCK_BYTES, hasher=lambda: hasher, syncer=syncer, hashes=hashes,
        stop=threading.Event(), idle_s=WAIT_S,
        sync_every_s=1e-9, on_written=reports.on_written, on_durable=reports.on_durable,
    )  # fmt: skip


def receive_in_thread(
    how: Reception, receiver: socket.socket, file_fd: int, size: int
) -> concurrent.futures.Future[Receipt]:
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="test-recv")
    return pool.submit(receive_into, how, os.dup(receiver.fileno()), file_fd, 0, [], size)


def test_the_body_goes_on_arriving_while_its_sync_runs(
    sockets: tuple[socket.socket, socket.socket], tmp_path: Path
) -> None:
    sender, receiver = sockets
    pieces = [os.urandom(MiB) for _ in range(3)]
    size = sum(map(len, pieces))
    path = tmp_path / "upload"
    syncer, reports, running = HeldExecutor(), Reports(), hashlib.sha256()
    how = reception(syncer, reports, [running])
    receiving = receive_in_thread(how, receiver, os.open(path, os.O_WRONLY | os.O_CREAT), size)

    sender.sendall(pieces[0])
    reports.wait_written(MiB)
    assert syncer.submitted == 1  # a sync of the first blocks began, and is held
    sender.sendall(pieces[1])
    reports.wait_written(2 * MiB)  # read and written while that sync is held
    assert syncer.submitted == 1, "a second sync began beside the one in flight"
    assert reports.durable() == []  # nothing is told durable before its sync returns
    sender.sendall(pieces[2])
    with pytest.raises(concurrent.futures.TimeoutError):  # the end waits for the sync
        receiving.result(timeout=0.2)
    syncer.release.set()
    receipt = receiving.result(timeout=WAIT_S)

    assert receipt.ending == "done" and receipt.end == size
    first_sync = reports.durable()[0]
    told_before = [end for end, durable in reports.told[: reports.told.index((first_sync, True))]]
    assert 0 < first_sync <= MiB and first_sync in told_before
    assert max(reports.durable()) < size  # the body's end is the caller's to commit
    assert path.read_bytes() == b"".join(pieces)
    assert running.hexdigest() == hashlib.sha256(b"".join(pieces)).hexdigest()


def test_a_sync_that_fails_fails_the_body(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    """/dev/null takes writes but refuses fdatasync (EINVAL): a real failing sync. A later
    fdatasync of the same file need not report an I/O error again, so the body must."""
    sender, receiver = sockets
    size = 3 * MiB
    syncer, reports = concurrent.futures.ThreadPoolExecutor(1), Reports()
    how = reception(syncer, reports, [hashlib.sha256()])
    receiving = receive_in_thread(how, receiver, os.open(os.devnull, os.O_WRONLY), size)
    sending = threading.Thread(target=send_until_closed, args=(sender, os.urandom(size)))
    sending.start()

    with pytest.raises(OSError) as raised:
        receiving.result(timeout=WAIT_S)
    assert raised.value.errno == errno.EINVAL
    assert reports.durable() == []
    receiver.close()  # the rest of the body is not read: the sender ends with an error
    sending.join(WAIT_S)
    assert not sending.is_alive()


def send_until_closed(sender: socket.socket, data: bytes) -> None:
    try:
        sender.sendall(data)
    except OSError:
        pass  # the receiver gave up and closed its end
