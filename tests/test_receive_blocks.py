"""How large the blocks of a body read in a thread (`files/receive.py`) are: the first two
512 KiB, then, on a long body, each twice the one before up to what the process's body
memory allows (`BodyMemory.receive_block_bytes`: 4 MiB while few bodies arrive, 512 KiB in a
crowd), and back down at once when a crowd arrives; a body too short to earn a larger
buffer's page faults back keeps 512 KiB. Whatever the sizes, every byte lands in order and
is hashed once.

The body is read from a real file standing in for the socket (a read of a file fills the
whole block, so each block is exactly as large as its buffer), into a real file; the
hashing executor is a real thread pool that notes the size of each block it is given.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tusserver.files import disk
from tusserver.files.receive import BLOCK_BYTES, GROWTH_RUNWAY, Reception, receive_into
from tusserver.uploads.body import WRITE_BLOCK_BYTES, BodyMemory

MiB = 2**20


class NotingPool(concurrent.futures.ThreadPoolExecutor):
    """A one-thread pool that notes the size of every block handed to it for hashing."""

    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="test-hash")
        self.sizes: list[int] = []

    def submit(  # type: ignore[override]
        self, fn: Callable[..., None], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[None]:
        self.sizes.append(len(args[1]))  # _feed(hashes, block)
        return super().submit(fn, *args, **kwargs)


@pytest.fixture
def hashing() -> Iterator[NotingPool]:
    pool = NotingPool()
    try:
        yield pool
    finally:
        pool.shutdown()


def receive_file(
    tmp_path: Path, body: bytes, block_bytes: Callable[[], int],
    hasher: Callable[[], NotingPool],
) -> tuple[bytes, str]:  # fmt: skip
    """Receive `body` from a file into another; what the target holds and its hash."""
    source, target = tmp_path / "body", tmp_path / "upload"
    source.write_bytes(body)
    running = hashlib.sha256()
    with concurrent.futures.ThreadPoolExecutor(1) as syncer:  # idle: no sync while it arrives
        how = Reception(
            check_free_space=lambda size: None, start_writeback=disk.start_writeback,
            block_bytes=block_bytes, hasher=hasher, syncer=syncer, hashes=[running],
            stop=threading.Event(), idle_s=30.0, sync_every_s=0.0,
            on_written=lambda end: None, on_durable=lambda end: None,
        )  # fmt: skip
        source_fd = os.open(source, os.O_RDONLY)
        target_fd = os.open(target, os.O_WRONLY | os.O_CREAT, 0o600)
        receipt = receive_into(how, source_fd, target_fd, 0, [], len(body))
    assert receipt.ending == "done" and receipt.end == len(body)
    return target.read_bytes(), running.hexdigest()


LONG_BODY_BYTES = (GROWTH_RUNWAY + 8) * WRITE_BLOCK_BYTES + 12345  # 4 MiB blocks pay off


def test_a_long_body_alone_grows_its_blocks_to_4_mib_and_lands_exactly(
    tmp_path: Path, hashing: NotingPool
) -> None:
    body = os.urandom(LONG_BODY_BYTES)
    stored, digest = receive_file(tmp_path, body, lambda: WRITE_BLOCK_BYTES, lambda: hashing)

    doubling = [BLOCK_BYTES * 2**step for step in (0, 0, 1, 1, 2, 2, 3, 3)]
    assert hashing.sizes[:8] == doubling  # two buffers, each twice as large as it was
    assert max(hashing.sizes) == WRITE_BLOCK_BYTES == doubling[-1]
    assert sum(hashing.sizes) == len(body)
    assert stored == body and digest == hashlib.sha256(body).hexdigest()


def test_blocks_shrink_at_once_when_a_crowd_arrives_and_the_bytes_stay_exact(
    tmp_path: Path, hashing: NotingPool
) -> None:
    asked = 0

    def crowd_after_six_blocks() -> int:
        nonlocal asked
        asked += 1
        return WRITE_BLOCK_BYTES if asked <= 6 else BLOCK_BYTES

    body = os.urandom((GROWTH_RUNWAY + 4) * 2 * BLOCK_BYTES + 7)  # long enough for 1 MiB blocks
    stored, digest = receive_file(tmp_path, body, crowd_after_six_blocks, lambda: hashing)

    assert max(hashing.sizes[:6]) > BLOCK_BYTES  # grown while alone
    assert max(hashing.sizes[6:]) <= BLOCK_BYTES  # every block after the crowd came
    assert stored == body and digest == hashlib.sha256(body).hexdigest()


def test_a_body_of_16_mib_alone_keeps_512_kib_blocks(tmp_path: Path, hashing: NotingPool) -> None:
    body = os.urandom(16 * MiB)
    stored, digest = receive_file(tmp_path, body, lambda: WRITE_BLOCK_BYTES, lambda: hashing)

    assert hashing.sizes == [BLOCK_BYTES] * 32
    assert stored == body and digest == hashlib.sha256(body).hexdigest()


def test_the_process_allows_4_mib_blocks_only_while_few_bodies_arrive() -> None:
    memory = BodyMemory(24 * MiB)  # the default --body-memory
    allowed: list[int] = []
    with memory.holding():
        allowed.append(memory.receive_block_bytes())  # one body: 12 MiB of budget each
        with memory.holding(), memory.holding():
            allowed.append(memory.receive_block_bytes())  # three: 4 MiB each
            with memory.holding():
                allowed.append(memory.receive_block_bytes())  # four: 3 MiB each
    assert allowed == [WRITE_BLOCK_BYTES, WRITE_BLOCK_BYTES, BLOCK_BYTES]
    assert memory.streaming == 0


def test_the_hashing_threads_are_asked_for_before_each_block(
    tmp_path: Path, hashing: NotingPool
) -> None:
    """A crowd that arrives midway moves a body's hashing to the crowd's (nicer) threads
    from its next block on; the bytes and the hash stay exact."""
    crowds = NotingPool()
    asked = 0

    def few_then_crowd() -> NotingPool:
        nonlocal asked
        asked += 1
        return hashing if asked <= 3 else crowds

    body = os.urandom(8 * BLOCK_BYTES + 99)
    try:
        stored, digest = receive_file(tmp_path, body, lambda: BLOCK_BYTES, few_then_crowd)
    finally:
        crowds.shutdown()
    assert len(hashing.sizes) == 3 and len(crowds.sizes) == 6
    assert sum(hashing.sizes) + sum(crowds.sizes) == len(body)
    assert stored == body and digest == hashlib.sha256(body).hexdigest()
