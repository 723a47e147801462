"""One PATCH's bytes going onto one upload: the loop that streams a body to disk.

It gathers the body's chunks into blocks of up to 4 MiB, writes one block (and feeds the
running hashes) in a worker thread while the next arrives, commits at the end, once a second
on long bodies and when another request asks through the upload's `Lease`, and keeps what
arrived when the client hangs up, the server stops or another request takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import StreamReader

from tusserver.errors import (
    BodyIncomplete,
    ChecksumMismatch,
    Interrupted,
    OffsetMismatch,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    TusError,
)
from tusserver.files.storage import FileShorter, UploadFile
from tusserver.protocol import Checksum
from tusserver.store.records import Upload
from tusserver.store.state import LockLost

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

    from tusserver.uploads.service import Uploads

log = logging.getLogger("tusserver.uploads.service")

WRITE_BLOCK_BYTES = 4 * 2**20
MIN_BLOCK_BYTES = 256 * 2**10
COMMIT_INTERVAL_S = 1.0


class BodyMemory:
    """One process's budget for request bodies held in memory (--body-memory). Each body
    that streams holds up to two blocks, one gathering and one being written, so a block is
    the budget over twice the bodies streaming: 4 MiB while few stream, less as more do, and
    never under 256 KiB (more thread hops per MiB, but the memory no longer grows 8 MiB per
    upload). A body that arrives slower than that is written once a second anyway."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.streaming = 0

    def block_bytes(self) -> int:
        share = self.budget_bytes // (2 * max(1, self.streaming))
        return max(MIN_BLOCK_BYTES, min(WRITE_BLOCK_BYTES, share))

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Count one more body streaming while the block is open."""
        self.streaming += 1
        try:
            yield
        finally:
            self.streaming -= 1


class TakenOver(Exception):
    """Set on a PATCH body's stream to wake the reader when another request takes over."""


class ShuttingDown(Exception):
    """Set on a PATCH body's stream when the server stops: commit what arrived, answer 503."""


@dataclass(eq=False)
class Lease:
    """A held upload lock, renewed in the background until released."""

    upload_id: str
    token: str
    stop_requested: bool = False
    lost: bool = False
    released: bool = False
    body: StreamReader | None = None
    session: AppendSession | None = None
    renewed_at: float = field(default_factory=time.monotonic)

    def wake_reader(self, error: Exception) -> None:
        if self.body is not None and self.body.exception() is None:
            self.body.set_exception(error)


def _unread_chunks(body: StreamReader) -> list[bytes]:
    """Bytes the stream received but had not handed out when it failed. aiohttp's `readany`
    raises a stored error (client hung up, takeover) before returning its buffer, yet those
    bytes did arrive in order after what was read, so they are kept. (aiohttp has no public
    way to take them; this reads its buffer, and finds nothing if that ever changes.)"""
    buffer = getattr(body, "_buffer", None)
    if not buffer:
        return []
    chunks = [bytes(chunk) for chunk in buffer]
    chunks[0] = chunks[0][int(getattr(body, "_buffer_offset", 0)) :]
    buffer.clear()
    return [chunk for chunk in chunks if chunk]


def _clear_wakeup(body: StreamReader) -> None:
    """Forget the error we set to wake the reader, so aiohttp can drain the rest of the body
    after the answer instead of logging our own signal as an unhandled exception."""
    if isinstance(body.exception(), (TakenOver, ShuttingDown, LockLost)):
        body._exception = None  # aiohttp offers no public way to clear it


async def read_small_body(
    body: StreamReader, size: int, idle_s: float
) -> tuple[bytes, BaseException | None]:
    """The first `size` bytes of `body` (a small body, held whole in memory) and, if it
    stopped before all of them arrived, why: TimeoutError after `idle_s` without its end, or
    the stream's error (the client hung up, or ShuttingDown set by `Uploads.stop_writers`).
    Bytes aiohttp buffered before the stop count as arrived."""
    chunks: list[bytes] = []
    received = 0
    stop: BaseException | None = None
    try:
        async with asyncio.timeout(idle_s):
            while received < size and (chunk := await body.readany()):
                chunks.append(chunk)
                received += len(chunk)
    except TimeoutError as error:
        stop = error
    except Exception as error:  # the client hung up, sent a broken body, or the server stops
        stop = error
        chunks += _unread_chunks(body)
    _clear_wakeup(body)  # a stop signal that came as the body ended is ours to forget
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


class AppendSession:
    """One PATCH's (or creation-with-upload's) bytes going onto one upload."""

    def __init__(
        self, uploads: Uploads, upload: Upload, lease: Lease, file: UploadFile | None
    ) -> None:
        self.uploads = uploads
        self.upload = upload
        self.lease = lease
        self.file = file
        self.written = upload.offset  # bytes of this upload on disk (committed or not)
        self.synced = upload.offset
        self.may_commit = True  # False while bytes on disk may have to be thrown away
        self.is_checksummed = False
        self.running_hash: Hash | None = None
        self.hashes: list[Hash] = []
        self.pending: list[bytes] = []  # received, not yet written
        self.pending_bytes = 0
        self.received = upload.offset  # offset plus every byte this request has received
        self.committed_at = time.monotonic()
        self._lock = asyncio.Lock()  # one write or commit at a time (the renew task commits)
        self.in_flight: asyncio.Task[None] | None = None  # the block being written

    @property
    def upload_id(self) -> str:
        return self.upload.upload_id

    async def declare_length(self, length: int) -> None:
        self.upload = await self.uploads.state.declare_length(self.upload, self.lease.token, length)

    async def commit(self, ack: str = "", *, release: bool = False) -> Upload:
        """Write what is gathered in memory and commit every byte on disk (after fsync, per
        the durability setting), unless this request's bytes may yet be thrown away.
        Completing the upload stores its SHA-256 and event when this process hashed every
        byte."""
        async with self._lock:
            upload = self.upload
            new_offset = self.written + self.pending_bytes if self.may_commit else upload.offset
            is_last = upload.length is not None and new_offset == upload.length
            needs_sync = self.uploads.storage.must_sync(completes=is_last)
            needs_sync = needs_sync and new_offset > self.synced and self.file is not None
            synced = self.may_commit and await self._flush(sync=needs_sync)
            if needs_sync and not synced and self.file is not None:
                await self.file.sync()
            if needs_sync:
                self.synced = new_offset
            sha256 = ""
            if is_last and self.running_hash is not None:
                sha256 = self.running_hash.hexdigest()
            now = time.time()
            status = "uploading" if not is_last else ("completed" if sha256 else "received")
            self.upload = await self.uploads.state.commit(
                upload, self.lease.token, new_offset, now=now,
                expires_at=self.uploads.expiry_for(status, now), sha256=sha256, ack=ack,
                path=self.uploads.storage.relative_path(upload.upload_id), release=release,
            )  # fmt: skip
            self.committed_at = time.monotonic()
            self.lease.released = release
            if self.upload.status == "received":
                self.uploads.finish_in_background(self.upload)
            return self.upload

    async def append(
        self,
        body: StreamReader,
        *,
        content_length: int | None,
        checksum: Checksum | None,
        max_bytes: int | None,
    ) -> Upload:
        """Stream `body` onto the file and commit it. Raises PayloadTooLarge (413) past the
        length or `max_bytes` (keeping nothing of this request), ChecksumMismatch (460),
        Interrupted (400) when another request took over, RequestTimeout (408) when the body
        stalls, BodyIncomplete (400) when the client hung up; those last three keep what
        arrived."""
        if self.file is None:  # the upload is complete: only an empty body fits
            if await body.readany():
                raise PayloadTooLarge("this upload is already complete")
            return self.upload
        uploads = self.uploads
        self.running_hash = uploads.hashes.take(self.upload_id, self.upload.offset)
        verifier = hashlib.new(checksum.algorithm) if checksum else None
        self.is_checksummed = checksum is not None
        self.hashes = [h for h in (self.running_hash, verifier) if h is not None]
        # Bytes of a checksummed or chunked (size unknown) body are committed only at its end:
        # they may yet have to be thrown away.
        self.may_commit = checksum is None and content_length is not None
        self.lease.body = body
        self.received = self.written
        with uploads.body_memory.holding():
            return await self._stream(body, checksum, verifier, max_bytes)

    async def _stream(
        self,
        body: StreamReader,
        checksum: Checksum | None,
        verifier: Hash | None,
        max_bytes: int | None,
    ) -> Upload:
        loop = asyncio.get_running_loop()
        idle = self.uploads.settings.idle_timeout_s
        memory = self.uploads.body_memory
        try:
            # The stall deadline covers waiting for the client only, never our own writes.
            async with asyncio.timeout(loop.time() + idle) as stall:
                while chunk := await body.readany():
                    self._gather(chunk, max_bytes)
                    if self.lease.stop_requested or self.lease.lost:
                        raise TakenOver()
                    is_due = time.monotonic() - self.committed_at > COMMIT_INTERVAL_S
                    is_full = self.pending_bytes >= memory.block_bytes()
                    if is_full or (is_due and self.may_commit):
                        stall.reschedule(None)
                        await self._settle_write()  # at most one block in flight
                        if is_due and self.may_commit:
                            await self.commit()
                        else:  # write this block while the next one arrives
                            self.in_flight = asyncio.create_task(self.flush())
                    stall.reschedule(loop.time() + idle)
            await self._settle_write()
            await self.flush()
            if checksum is not None and verifier is not None:
                if verifier.digest() != checksum.digest:
                    raise ChecksumMismatch(checksum.algorithm)
            self.may_commit = True
            return await asyncio.shield(self._commit_and_remember(release=True))
        except TusError:
            self.may_commit = False
            await self._settle_write(quietly=True)
            await self._discard()
            raise
        except (TakenOver, LockLost, TimeoutError, ShuttingDown) as stop:
            _clear_wakeup(body)
            await self._settle_write(quietly=True)
            await self._keep_what_arrived()
            raise refusal_for(stop, self.upload.offset, idle) from None
        except Exception as stop:  # the client hung up or sent a broken body: keep what arrived
            await self._settle_write(quietly=True)
            await self._keep_what_arrived()
            raise refusal_for(stop, self.upload.offset, idle) from None

    async def append_small(
        self, body: StreamReader, size: int, checksum: Checksum | None, max_bytes: int | None
    ) -> Upload:
        """`append` for a body of at most SMALL_BODY_BYTES with a known size: read whole
        while the lock is held, then written, hashed and made durable (per --fsync) in one
        thread hop that also opens and closes the file (`Storage.append_holding`), and
        committed with the lock's release in one Redis step. The same answers as `append`; a
        file shorter than the committed offset moves the offset back and answers 409."""
        upload = self.upload
        if upload.status != "uploading":
            raise PayloadTooLarge("this upload is already complete")
        if upload.length is None and max_bytes is not None and upload.offset + size > max_bytes:
            raise PayloadTooLarge(f"the upload would pass the maximum size of {max_bytes} bytes")
        idle = self.uploads.settings.idle_timeout_s
        self.lease.body = body  # a takeover, a lost lock or a stop wakes the read
        data, stop = await read_small_body(body, size, idle)
        data, mismatch = verified_small_body(data, stop, checksum)
        if mismatch is not None:
            raise mismatch
        if self.lease.lost:
            raise refusal_for(LockLost(), upload.offset, idle)
        if data:
            await self._write_small(data)
        try:
            upload = await self._commit_and_remember(release=True)
        except LockLost:
            raise refusal_for(LockLost(), upload.offset, idle) from None
        if stop is not None:
            raise refusal_for(stop, upload.offset, idle)
        return upload

    async def _write_small(self, data: bytes) -> None:
        """Write `data` at the committed offset in one thread hop (see `append_small`)."""
        uploads, upload = self.uploads, self.upload
        running = uploads.hashes.take(self.upload_id, upload.offset)
        new_offset = upload.offset + len(data)
        sync = uploads.storage.must_sync(completes=new_offset == upload.length)
        hashes = [running] if running is not None else []
        try:
            await uploads.storage.append_holding(
                self.upload_id, upload.offset, data, hashes, sync=sync
            )
        except FileShorter as short:
            log.warning("upload %s: file shorter than its offset, rewinding", self.upload_id)
            await self.commit_offset(short.size)
            raise OffsetMismatch(expected=short.size, got=upload.offset) from None
        except BaseException:
            if running is not None:  # the file was cut back: the hash still fits the offset
                uploads.hashes.keep(self.upload_id, upload.offset, running)
            raise
        self.running_hash = running
        self.written = self.synced = new_offset

    async def commit_offset(self, offset: int) -> None:
        """Move the committed offset back to `offset` (the bytes past it are gone)."""
        now = time.time()
        self.upload = await self.uploads.state.commit(
            self.upload, self.lease.token, offset, now=now,
            expires_at=self.uploads.expiry_for("uploading", now),
        )  # fmt: skip
        self.written = self.synced = offset

    def _gather(self, chunk: bytes, max_bytes: int | None) -> None:
        """Keep `chunk` in memory for the next write, if the upload has room for it."""
        length = self.upload.length
        total = self.received + len(chunk)
        if length is not None and total > length:
            raise PayloadTooLarge("the body runs past Upload-Length; nothing of it was kept")
        if length is None and max_bytes is not None and total > max_bytes:
            raise PayloadTooLarge(f"the upload would pass the maximum size of {max_bytes} bytes")
        self.received = total
        self.pending.append(chunk)
        self.pending_bytes += len(chunk)

    async def _settle_write(self, *, quietly: bool = False) -> None:
        """Wait for the block being written; its error is raised unless `quietly` (its
        chunks are then back in memory, for the caller's commit or discard)."""
        task, self.in_flight = self.in_flight, None
        if task is None:
            return
        if quietly:
            await asyncio.gather(asyncio.shield(task), return_exceptions=True)
        else:
            await task

    async def flush(self) -> None:
        """Write the gathered chunks (one thread hop, hashed in the same hop)."""
        async with self._lock:
            await self._flush()

    async def _flush(self, *, sync: bool = False) -> bool:
        """Write the gathered chunks (and with `sync`, make the file durable in the same
        thread hop); False if there was nothing to write."""
        if not self.pending or self.file is None:
            return False
        chunks, size = self.pending, self.pending_bytes
        self.pending, self.pending_bytes = [], 0  # the reader goes on gathering meanwhile
        try:
            await self.file.write(self.written, chunks, self.hashes, sync=sync)
        except BaseException:
            self.pending, self.pending_bytes = chunks + self.pending, size + self.pending_bytes
            # the thread may have written and hashed some of them: the file is hashed later
            if self.running_hash is not None:
                self.hashes.remove(self.running_hash)
                self.running_hash = None
            raise
        self.written += size
        return True

    async def _keep_what_arrived(self) -> None:
        """Commit the bytes that arrived before the stop, including those aiohttp had buffered
        but not handed out, unless they cannot be kept (a checksummed body: unverifiable) or
        the lock is gone."""
        self.may_commit = not (self.lease.lost or self.is_checksummed)
        if not self.may_commit:
            await self._discard()
            return
        if self.lease.body is not None:
            for chunk in _unread_chunks(self.lease.body):
                try:
                    self._gather(chunk, None)
                except PayloadTooLarge:
                    break
        with contextlib.suppress(Exception):
            await asyncio.shield(self._commit_and_remember())

    async def _discard(self) -> None:
        """Leave the file as it was before this request (while we still hold the lock)."""
        async with self._lock:
            self.pending, self.pending_bytes = [], 0
            if self.file is None or self.lease.lost or self.written == self.upload.offset:
                return
            with contextlib.suppress(Exception):
                await asyncio.shield(self.file.truncate(self.upload.offset))
            self.written = self.upload.offset

    async def _commit_and_remember(self, *, release: bool = False) -> Upload:
        upload = await self.commit(release=release)
        if self.running_hash is not None and upload.status == "uploading":
            self.uploads.hashes.keep(self.upload_id, upload.offset, self.running_hash)
        return upload
