"""A request body on its way to an upload: what the handler hands down (`Body`, `SizeLimit`),
how much of it a process may hold in memory (`BodyMemory`), reading a small one whole, and
the answer when a body stops early. aiohttp's private details stay in `aiohttp_private`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace

from aiohttp import StreamReader

from tusserver.aiohttp_private import TakenBody, clear_error, unread_chunks
from tusserver.errors import (
    BodyIncomplete,
    ChecksumMismatch,
    Interrupted,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    TusError,
)
from tusserver.files import receive
from tusserver.protocol import Checksum
from tusserver.store.state import LockLost

# Bodies of a known size up to this are read whole, then written in one thread hop and
# committed in one Redis step (measured: benchmarks/README.md, scenarios b and d).
SMALL_BODY_BYTES = 64 * 2**10
WRITE_BLOCK_BYTES = 4 * 2**20
MIN_BLOCK_BYTES = 256 * 2**10
# Bodies streaming at once in one process up to which their blocks are hashed at the
# loop's priority: as many as get 4 MiB blocks at the default --body-memory. Under 32
# concurrent uploads (16 a process) hashing at the loop's priority doubled a resuming
# client's p99 (benchmarks/README.md, scenario f).
FEW_BODIES = 3


class TakenOver(Exception):
    """Set on a body's stream to wake the reader when another request takes the upload."""


class ShuttingDown(Exception):
    """Set on a body's stream when the server stops: commit what arrived, answer 503."""


async def _nothing_to_announce() -> None:
    return None


@dataclass(frozen=True)
class Body:
    """A request's body as the upload service takes it."""

    stream: StreamReader
    content_length: int | None  # None: chunked, size unknown
    checksum: Checksum | None  # Upload-Checksum, to verify before anything is kept
    # Called once every check before the body has passed (answers `Expect: 100-continue`).
    before_reading: Callable[[], Awaitable[None]] = _nothing_to_announce
    # The body is the whole upload (a form's file part): a deferred length becomes what
    # arrived once the body ends, so the upload completes in the same commit.
    is_whole_upload: bool = False
    # Takes the rest of the body away from aiohttp, to be read straight from its socket in
    # a thread (`aiohttp_private.take_body`); None where the body has no socket of its own.
    take: Callable[[], TakenBody | None] | None = None

    @property
    def is_small(self) -> bool:
        """A body of known size, at most SMALL_BODY_BYTES: read whole, written in one hop."""
        return self.content_length is not None and 0 < self.content_length <= SMALL_BODY_BYTES


@dataclass(frozen=True)
class SizeLimit:
    """The most bytes one upload may hold for this request: the smaller of the server's
    --max-size and the token's maximum (None: no limit). Computed once per request.
    `earlier_bytes`: what earlier uploads of the same request hold (a form's files count
    together against the limit)."""

    max_bytes: int | None
    whose: str = "this server's"
    earlier_bytes: int = 0

    @classmethod
    def of(cls, server_max: int | None, token_max: int | None) -> SizeLimit:
        if token_max is not None and (server_max is None or token_max < server_max):
            return cls(token_max, "this token's")
        return cls(server_max, "this server's")

    def after(self, earlier_bytes: int) -> SizeLimit:
        """The limit for an upload that follows `earlier_bytes` of the same request's."""
        return replace(self, earlier_bytes=self.earlier_bytes + earlier_bytes)

    @property
    def room_bytes(self) -> int | None:
        """The most bytes the next upload may hold (None: no limit)."""
        return None if self.max_bytes is None else max(0, self.max_bytes - self.earlier_bytes)

    def check(self, size: int | None, what: str = "Upload-Length") -> None:
        """413 if `size` bytes are more than the limit (None, not known yet, passes)."""
        room = self.room_bytes
        if room is None or size is None or size <= room:
            return
        if self.earlier_bytes:
            raise PayloadTooLarge(
                f"{what}, with the {self.earlier_bytes} bytes of this request's earlier files, "
                f"is over {self.whose} maximum of {self.max_bytes} bytes"
            )
        raise PayloadTooLarge(f"{what} is over {self.whose} maximum of {self.max_bytes} bytes")


class BodyMemory:
    """One process's budget for request bodies held in memory (--body-memory). Each body
    that streams holds up to two blocks (on the event loop one gathering and one being
    written; in a receiving thread one being read and one being hashed), so a block is the
    budget over twice the bodies streaming: 4 MiB while few stream, less as more do, and
    never under 256 KiB (more thread hops per MiB, but the memory no longer grows 8 MiB per
    upload). A body that arrives slower than that is written once a second anyway."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.streaming = 0

    def block_bytes(self) -> int:
        share = self.budget_bytes // (2 * max(1, self.streaming))
        return max(MIN_BLOCK_BYTES, min(WRITE_BLOCK_BYTES, share))

    def receive_block_bytes(self) -> int:
        """The largest block a receiving thread (`files.receive`) may read next: 4 MiB while
        the budget allows each body that much (a lone 1 GiB PATCH moved 12-30% more than
        with 512 KiB, in fewer hand-overs to the hashing thread), else 512 KiB. Sizes in
        between, under 32 concurrent uploads, let the receiving threads hold the cores longer
        and raised a resuming client's p99 from 88-136 ms to 129-184 (benchmarks/README.md,
        scenario f)."""
        roomy = self.block_bytes() >= WRITE_BLOCK_BYTES  # the budget, not `is_few`'s count
        return WRITE_BLOCK_BYTES if roomy else receive.BLOCK_BYTES

    def is_few(self) -> bool:
        """Whether at most FEW_BODIES bodies stream in this process: their hashing then
        runs at the loop's priority (`files.storage.Storage.bulk_for`). A count, not the
        budget: a larger --body-memory gives a crowd larger blocks, not the loop's CPU."""
        return self.streaming <= FEW_BODIES

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Count one more body streaming while the block is open."""
        self.streaming += 1
        try:
            yield
        finally:
            self.streaming -= 1


def forget_wakeup(stream: StreamReader) -> None:
    """Forget an error we set to wake the reader (never the client's own)."""
    if isinstance(stream.exception(), (TakenOver, ShuttingDown, LockLost)):
        clear_error(stream)


def take_unread(stream: StreamReader) -> list[bytes]:
    """Bytes the stream received but had not handed out when it failed: they did arrive, in
    order, after what was read, so they count as arrived."""
    return unread_chunks(stream)


async def read_small_body(
    stream: StreamReader, size: int, idle_s: float
) -> tuple[bytes, BaseException | None]:
    """The first `size` bytes of `stream` (a small body, held whole in memory) and, if it
    stopped before all of them arrived, why: TimeoutError after `idle_s` without its end, or
    the stream's error (the client hung up, or a stop set by the service). Bytes aiohttp
    buffered before the stop count as arrived."""
    chunks: list[bytes] = []
    received = 0
    stop: BaseException | None = None
    try:
        async with asyncio.timeout(idle_s):
            while received < size and (chunk := await stream.readany()):
                chunks.append(chunk)
                received += len(chunk)
    except TimeoutError as error:
        stop = error
    except Exception as error:  # the client hung up, sent a broken body, or the server stops
        stop = error
        chunks += take_unread(stream)
    forget_wakeup(stream)  # a stop signal that came as the body ended is ours to forget
    data = b"".join(chunks)[:size]
    if len(data) == size:  # every byte arrived: whatever stopped the stream came after
        return data, None
    return data, stop or BodyIncomplete("the request body ended early")


def verified_small_body(
    data: bytes, stop: BaseException | None, checksum: Checksum | None
) -> tuple[bytes, ChecksumMismatch | None]:
    """What of a small body (`read_small_body`) may be kept: all that arrived, or with an
    `Upload-Checksum`, the whole body if it matches and nothing otherwise (with the mismatch
    to answer when the whole body arrived)."""
    if checksum is None:
        return data, None
    if stop is not None:
        return b"", None
    if hashlib.new(checksum.algorithm, data).digest() != checksum.digest:
        return b"", ChecksumMismatch(checksum.algorithm)
    return data, None


def refusal_for(stop: BaseException, committed: int, idle_s: float) -> TusError:
    """The answer to a body that stopped early, once what could be kept of it is committed
    (`committed`: the upload's offset now)."""
    if isinstance(stop, TimeoutError):
        return RequestTimeout(f"the body stalled for {idle_s:g} s; {committed} bytes are committed")
    if isinstance(stop, ShuttingDown):
        return ServiceUnavailable(f"the server is restarting; {committed} bytes are committed", 2)
    if isinstance(stop, LockLost):
        return ServiceUnavailable("lost the upload's lock; retry", 1)
    if isinstance(stop, TakenOver):
        return Interrupted(committed)
    return BodyIncomplete(f"the request body ended early; {committed} bytes are committed")
