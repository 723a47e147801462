"""One request's bytes going onto one upload: a small body in one step, or a long one streamed.

A long body's chunks are gathered into blocks of up to 4 MiB; one block is written (and feeds
the running hashes) in a worker thread while the next arrives; what arrived is committed at
the end, once a second on long bodies, and when another request asks through the upload's
`Lease`; a client that hangs up, a server that stops and a request that takes over keep
what arrived. The session is handed what it needs (`AppendContext`), never the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import StreamReader

from tusserver.aiohttp_private import TakenBody
from tusserver.errors import ChecksumMismatch, OffsetMismatch, PayloadTooLarge, TusError
from tusserver.files.storage import FileShorter, Storage, UploadFile
from tusserver.protocol import Checksum
from tusserver.store.records import Upload
from tusserver.store.state import LockLost, UploadState
from tusserver.uploads.body import (
    Body,
    BodyMemory,
    ShuttingDown,
    SizeLimit,
    TakenOver,
    forget_wakeup,
    read_small_body,
    refusal_for,
    take_unread,
    verified_small_body,
)
from tusserver.uploads.hashing import RunningHashes
from tusserver.uploads.lease import Lease
from tusserver.uploads.lifetimes import Lifetimes
from tusserver.uploads.receiving import COMMIT_INTERVAL_S, receive_taken

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

log = logging.getLogger("tusserver.uploads")


@dataclass(frozen=True)
class AppendContext:
    """What an append session needs of the process: no more."""

    state: UploadState
    storage: Storage
    hashes: RunningHashes
    body_memory: BodyMemory
    lifetimes: Lifetimes
    idle_timeout_s: float
    # Hash a `received` upload's file off the request (its process lost the running hash).
    finish_later: Callable[[Upload], None]
    # Told +1 when a request starts writing bytes onto an upload, -1 when it ends (metrics).
    count_in_flight: Callable[[int], None]
    # Told where each streamed body is read as it starts: "thread" or "event_loop" (metrics).
    count_streamed: Callable[[str], None]
    # The smallest body read straight from its socket in a thread (`files.receive`).
    direct_body_bytes: int


def _waker(stream: StreamReader) -> Callable[[Exception], None]:
    """A lease's `wake_reader` for a body read from `stream`."""

    def wake(error: Exception) -> None:
        if stream.exception() is None:
            stream.set_exception(error)

    return wake


class AppendSession:
    """One PATCH's (or creation-with-upload's) bytes going onto one upload, under its lease."""

    def __init__(
        self, context: AppendContext, upload: Upload, lease: Lease, file: UploadFile | None = None
    ) -> None:
        self.context = context
        self.upload = upload
        self.lease = lease
        self.file = file  # open for a creation with upload; a PATCH opens it when it streams
        self.written = upload.offset  # bytes of this upload on disk (committed or not)
        self.synced = upload.offset
        self.may_commit = True  # False while bytes on disk may have to be thrown away
        self.is_checksummed = False
        self.is_whole_upload = False  # the body's end sets a deferred length (Body)
        self.running_hash: Hash | None = None
        self.hashes: list[Hash] = []
        self.pending: list[bytes] = []  # received, not yet written
        self.pending_bytes = 0
        self.received = upload.offset  # offset plus every byte this request has received
        self.committed_at = time.monotonic()
        self.stream: StreamReader | None = None
        self._lock = asyncio.Lock()  # one write or commit at a time (the renew task commits)
        self.in_flight: asyncio.Task[None] | None = None  # the block being written
        self.stop = threading.Event()  # set to stop a body read from its socket
        self.stop_error: Exception | None = None  # why it was stopped (the lease's reason)
        # A receiving thread failed mid-write: the file may hold more than `written` says.
        self.end_unknown = False

    @property
    def upload_id(self) -> str:
        return self.upload.upload_id

    async def close(self) -> None:
        """Close the upload's file if this session has it open."""
        file, self.file = self.file, None
        if file is not None:
            await file.close()

    async def declare_length(self, length: int) -> Upload:
        """Set a deferred length (400 if it contradicts what is known)."""
        self.upload = await self.context.state.declare_length(self.upload, self.lease.token, length)
        return self.upload

    async def append(self, body: Body, limit: SizeLimit) -> Upload:
        """Append `body` at the committed offset and commit it; a small body of known size is
        read whole and written in one step, any other streams. Raises PayloadTooLarge (413)
        before reading a body that cannot fit, and past the length or `limit` while reading
        (keeping nothing of this request), ChecksumMismatch (460), Interrupted (400) when
        another request took over, RequestTimeout (408) when the body stalls, BodyIncomplete
        (400) when the client hung up, ServiceUnavailable (503) when the server stops or the
        lock is lost; those keep what arrived (unless checksummed). A file shorter than the
        committed offset moves the offset back and answers 409 with it."""
        self.context.count_in_flight(1)
        try:
            return await self._append(body, limit)
        finally:
            self.context.count_in_flight(-1)

    async def _append(self, body: Body, limit: SizeLimit) -> Upload:
        upload = self.upload
        size = body.content_length
        if upload.length is not None and upload.offset + (size or 0) > upload.length:
            raise PayloadTooLarge("the body would run past Upload-Length")
        if upload.length is None and size is not None:
            limit.check(upload.offset + size, "the upload")
        is_streamed = upload.status == "uploading" and not body.is_small
        if is_streamed and self.file is None:
            await self._open()  # a short file answers 409 before the body is invited
        await body.before_reading()
        if upload.status != "uploading":  # complete: only an empty body fits
            if await body.stream.readany():
                raise PayloadTooLarge("this upload is already complete")
            return upload
        if body.is_small:
            return await self._append_small(body)
        taken = self._take(body)
        try:
            self.context.count_streamed("event_loop" if taken is None else "thread")
            wake = _waker(body.stream) if taken is None else self._stop_receiving
            self.lease.listen(wake_reader=wake, commit_now=self.commit)
            return await self._append_streamed(body, limit, taken)
        finally:
            if taken is not None:
                self.context.storage.free_receiver()

    def _take(self, body: Body) -> TakenBody | None:
        """The rest of `body`, taken to be read straight from its socket by a receiving
        thread (`files.receive`, which `free_receiver` frees after): a large body of known
        size with a socket of its own, while a thread is free. None: read on the loop."""
        size = body.content_length
        too_small = size is None or size < self.context.direct_body_bytes
        if body.take is None or too_small or self.file is None:
            return None
        if not self.context.storage.take_receiver():
            return None
        taken = body.take()
        if taken is None:  # TLS, or out of descriptors: no thread is kept for it
            self.context.storage.free_receiver()
        return taken

    def _stop_receiving(self, error: Exception) -> None:
        """The lease's `wake_reader` for a body read from its socket: stop the thread."""
        if self.stop_error is None:
            self.stop_error = error
        self.stop.set()

    async def commit(
        self, ack: str = "", *, release: bool = False, durable_only: bool = False
    ) -> Upload:
        """Write what is gathered in memory and commit every byte on disk (after fsync, per
        the durability setting), unless this request's bytes may yet be thrown away; with
        `durable_only`, only the bytes already made durable (by a receiving thread).
        Completing the upload stores its SHA-256 and event when this process hashed every
        byte."""
        async with self._lock:
            upload = self.upload
            new_offset = self.written + self.pending_bytes if self.may_commit else upload.offset
            if durable_only:
                new_offset = max(upload.offset, min(new_offset, self.synced))
            is_last = upload.length is not None and new_offset == upload.length
            needs_sync = self.context.storage.must_sync(completes=is_last)
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
            self.upload = await self.context.state.commit(
                upload, self.lease.token, new_offset, now=now,
                expires_at=self.context.lifetimes.expires_at(status, now), sha256=sha256,
                ack=ack, release=release,
            )  # fmt: skip
            self.committed_at = time.monotonic()
            self.lease.released = release
            if self.upload.status == "received":
                self.context.finish_later(self.upload)
            return self.upload

    async def _open(self) -> None:
        """Open the file at the committed offset; a file shorter than that offset (bytes
        lost with the page cache) moves the offset back and answers 409 with it."""
        file, size = await self.context.storage.open_for_append(self.upload_id, self.upload.offset)
        self.file = file
        if size < self.upload.offset:
            await self._rewind(size)

    async def _rewind(self, size: int) -> None:
        log.warning("upload %s: file shorter than its offset, rewinding", self.upload_id)
        client_offset = self.upload.offset
        await self.commit_offset(size)
        raise OffsetMismatch(expected=size, got=client_offset)

    async def _append_streamed(
        self, body: Body, limit: SizeLimit, taken: TakenBody | None
    ) -> Upload:
        context = self.context
        checksum = body.checksum
        self.running_hash = context.hashes.take(self.upload_id, self.upload.offset)
        verifier = hashlib.new(checksum.algorithm) if checksum else None
        self.is_checksummed = checksum is not None
        self.hashes = [h for h in (self.running_hash, verifier) if h is not None]
        # Bytes of a checksummed or chunked (size unknown) body are committed only at its end:
        # they may yet have to be thrown away.
        self.may_commit = checksum is None and body.content_length is not None
        self.stream = body.stream if taken is None else None
        self.received = self.written
        self.is_whole_upload = body.is_whole_upload
        memory = context.body_memory
        if taken is None:
            transfer = self._read_and_write(body.stream, limit)
        else:
            storage, idle_s = context.storage, context.idle_timeout_s
            transfer = receive_taken(self, taken, storage, idle_s, memory)
        with memory.holding():
            return await self._stream(body.stream, checksum, verifier, transfer)

    async def _read_and_write(self, body: StreamReader, limit: SizeLimit) -> None:
        """Move the body onto the file on the event loop: chunks gathered into blocks, one
        block written (in a bulk thread) while the next arrives, committed once a second."""
        loop = asyncio.get_running_loop()
        idle = self.context.idle_timeout_s
        memory = self.context.body_memory
        # The stall deadline covers waiting for the client only, never our own writes.
        async with asyncio.timeout(loop.time() + idle) as stall:
            while chunk := await body.readany():
                self._gather(chunk, limit)
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

    async def _stream(
        self,
        body: StreamReader,
        checksum: Checksum | None,
        verifier: Hash | None,
        transfer: Coroutine[object, object, None],
    ) -> Upload:
        """Run `transfer` (the body onto the file), then verify, commit and release; or,
        when it stops early, keep what arrived (or nothing) and raise the refusal."""
        idle = self.context.idle_timeout_s
        try:
            await transfer
            if checksum is not None and verifier is not None:
                if verifier.digest() != checksum.digest:
                    raise ChecksumMismatch(checksum.algorithm)
            if self.is_whole_upload and self.upload.length is None:
                await self.declare_length(self.written)  # under the lock, before the commit
            self.may_commit = True
            return await asyncio.shield(self._commit_and_remember(release=True))
        except TusError:
            self.may_commit = False
            await self._settle_write(quietly=True)
            await self._discard()
            raise
        except (TakenOver, LockLost, TimeoutError, ShuttingDown) as stop:
            forget_wakeup(body)
            await self._settle_write(quietly=True)
            await self._keep_what_arrived()
            raise refusal_for(stop, self.upload.offset, idle) from None
        except Exception as stop:  # the client hung up or sent a broken body: keep what arrived
            await self._settle_write(quietly=True)
            await self._keep_what_arrived()
            raise refusal_for(stop, self.upload.offset, idle) from None

    async def _append_small(self, body: Body) -> Upload:
        """A body of at most SMALL_BODY_BYTES with a known size: read whole while the lock is
        held (a takeover, a lost lock or a stop wakes the read), then written, hashed and
        made durable (per --fsync) in one thread hop that also opens and closes the file
        (`Storage.append_holding`), and committed with the lock's release in one Redis step."""
        upload = self.upload
        assert body.content_length is not None
        idle = self.context.idle_timeout_s
        self.lease.listen(wake_reader=_waker(body.stream))
        data, stop = await read_small_body(body.stream, body.content_length, idle)
        data, mismatch = verified_small_body(data, stop, body.checksum)
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
        context, upload = self.context, self.upload
        running = context.hashes.take(self.upload_id, upload.offset)
        new_offset = upload.offset + len(data)
        sync = context.storage.must_sync(completes=new_offset == upload.length)
        hashes = [running] if running is not None else []
        try:
            await context.storage.append_holding(
                self.upload_id, upload.offset, data, hashes, sync=sync
            )
        except FileShorter as short:
            await self._rewind(short.size)
        except BaseException:
            if running is not None:  # the file was cut back: the hash still fits the offset
                context.hashes.keep(self.upload_id, upload.offset, running)
            raise
        self.running_hash = running
        self.written = self.synced = new_offset

    async def commit_offset(self, offset: int) -> None:
        """Move the committed offset back to `offset` (the bytes past it are gone)."""
        now = time.time()
        self.upload = await self.context.state.commit(
            self.upload, self.lease.token, offset, now=now,
            expires_at=self.context.lifetimes.expires_at("uploading", now),
        )  # fmt: skip
        self.written = self.synced = offset

    def _gather(self, chunk: bytes, limit: SizeLimit | None) -> None:
        """Keep `chunk` in memory for the next write, if the upload has room for it."""
        length = self.upload.length
        total = self.received + len(chunk)
        if length is not None and total > length:
            raise PayloadTooLarge("the body runs past Upload-Length; nothing of it was kept")
        if length is None and limit is not None:
            limit.check(total, "the upload")
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
            few = self.context.body_memory.is_few()
            await self.file.write(self.written, chunks, self.hashes, sync=sync, few=few)
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
        if self.stream is not None:
            for chunk in take_unread(self.stream):
                try:
                    self._gather(chunk, None)
                except PayloadTooLarge:
                    break
        try:
            await asyncio.shield(self._commit_and_remember())
        except Exception as error:  # the client resumes from the last commit: nothing is lost
            log.warning(
                "upload %s: what arrived before the request stopped was not kept, the offset "
                "stays at %d: %s", self.upload_id, self.upload.offset, error,
            )  # fmt: skip

    async def _discard(self) -> None:
        """Leave the file as it was before this request (while we still hold the lock)."""
        async with self._lock:
            self.pending, self.pending_bytes = [], 0
            if self.file is None or self.lease.lost:
                return
            if self.written == self.upload.offset and not self.end_unknown:
                return
            with contextlib.suppress(Exception):
                await asyncio.shield(self.file.truncate(self.upload.offset))
            self.written = self.upload.offset

    async def _commit_and_remember(self, *, release: bool = False) -> Upload:
        upload = await self.commit(release=release)
        if self.running_hash is not None and upload.status == "uploading":
            self.context.hashes.keep(self.upload_id, upload.offset, self.running_hash)
        return upload
