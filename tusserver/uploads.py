"""What a handler asks of an upload, composed of `state` (Redis) and `storage` (disk).

The PATCH loop lives here: it streams the body in bounded chunks, gathers them into 1-4 MiB
writes, commits at the end, at bounded intervals and when another request asks, and keeps
what arrived when the client hangs up. Locks are held through a `Lease` whose renew task
listens for requests from other requests (stop, or commit now).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import StreamReader

from tusserver.errors import (
    BadRequest,
    BodyIncomplete,
    ChecksumMismatch,
    Interrupted,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    TusError,
    UploadGone,
    UploadLocked,
    UploadNotFound,
)
from tusserver.protocol import Checksum
from tusserver.settings import Settings
from tusserver.state import LockLost, Upload, UploadState, new_upload_id
from tusserver.storage import Storage, UploadFile
from tusserver.tasks import cancel_and_wait, was_cancelled

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

log = logging.getLogger("tusserver.uploads")

WRITE_BLOCK_BYTES = 4 * 2**20
LOCK_TTL_MS = 3000
RENEW_INTERVAL_S = 0.1
TAKEOVER_WAIT_S = 1.0
COMMIT_INTERVAL_S = 1.0
RECEIVED_GRACE_S = 60.0  # a `received` upload not completed by then is hashed by the sweeper
_POLL_S = 0.02


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


class RunningHashes:
    """SHA-256 objects of uploads this process is receiving, each valid at one offset."""

    def __init__(self, capacity: int = 1024) -> None:
        self._hashes: OrderedDict[str, tuple[int, Hash]] = OrderedDict()
        self._capacity = capacity

    def take(self, upload_id: str, offset: int) -> Hash | None:
        """The hash of bytes [0, offset), or None if this process does not have it."""
        if offset == 0:
            self._hashes.pop(upload_id, None)
            return hashlib.sha256()
        entry = self._hashes.pop(upload_id, None)
        return entry[1] if entry is not None and entry[0] == offset else None

    def keep(self, upload_id: str, offset: int, running: Hash) -> None:
        self._hashes[upload_id] = (offset, running)
        while len(self._hashes) > self._capacity:
            self._hashes.popitem(last=False)


class Uploads:
    """The upload service of one process."""

    def __init__(self, state: UploadState, storage: Storage, settings: Settings) -> None:
        self.state = state
        self.storage = storage
        self.settings = settings
        self.hashes = RunningHashes()
        self._background: set[asyncio.Task[None]] = set()
        self._leases: set[Lease] = set()
        self.is_stopping = False

    # -- expiry times ----------------------------------------------------------------------

    def expiry_for(self, status: str, now: float) -> float | None:
        if status == "uploading":
            return now + self.settings.expire_after_s
        if status == "received":
            return now + RECEIVED_GRACE_S
        retention = self.settings.retention_s
        return None if retention is None else now + retention

    # -- create, read, remove --------------------------------------------------------------

    async def create(
        self, *, owner: str, length: int | None, metadata: str, concat: str, url_of: str
    ) -> Upload:
        """Create the upload's file and state; an empty upload is complete at once."""
        upload_id = new_upload_id()
        now = time.time()
        empty = length == 0
        upload = Upload(
            upload_id=upload_id,
            owner=owner,
            offset=0,
            length=length,
            metadata=metadata,
            status="completed" if empty else "uploading",
            created_at=now,
            expires_at=self.expiry_for("completed" if empty else "uploading", now),
            url=url_of.replace("{id}", upload_id),
            concat=concat,
            sha256=hashlib.sha256().hexdigest() if empty else "",
        )
        await self.storage.create(upload_id)
        await self.state.create(upload, path=self.storage.relative_path(upload_id))
        return upload

    async def current(self, upload_id: str, owner: str) -> Upload:
        """The upload as committed now: a running PATCH is asked to commit what it has first
        (waiting at most about a second). 404/410 inside."""
        upload = await self.state.get(upload_id, owner)
        if upload.status != "uploading":
            return upload
        nonce = secrets.token_hex(6)
        if not await self.state.ask_holder(upload_id, f"commit:{nonce}", LOCK_TTL_MS):
            return upload
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
            if await self.state.holder_answered(upload_id, nonce):
                break
        return await self.state.get(upload_id, owner)

    def file_path(self, upload: Upload) -> Path:
        """Where a completed upload's bytes are, for a download response."""
        return self.storage.path_of(upload.upload_id)

    async def list_owned(
        self, owner: str, after: tuple[float, str] | None, limit: int
    ) -> list[Upload]:
        return await self.state.list_owned(owner, after=after, limit=limit)

    async def terminate(self, upload_id: str, owner: str) -> None:
        """Delete the upload (state first, then its file), taking it from any running PATCH."""
        async with self.locked(upload_id, owner) as (upload, lease):
            await self.state.remove(
                upload,
                "terminated",
                now=time.time(),
                path=self.storage.relative_path(upload_id),
                lock_token=lease.token,
            )
        await self.storage.delete(upload_id)

    # -- locking ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def locked(
        self, upload_id: str, owner: str, *, takeover: bool = True
    ) -> AsyncIterator[tuple[Upload, Lease]]:
        """Hold the upload's lock: a running holder is asked to stop and commit (unless not
        `takeover`), and 423 follows if it does not let go within about a second. 404/410."""
        if self.is_stopping:
            raise ServiceUnavailable("the server is restarting; retry shortly", 2)
        acquired = await self.state.acquire(upload_id, owner, LOCK_TTL_MS)
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        while acquired is None:
            if time.monotonic() > deadline:
                raise UploadLocked()
            if takeover:
                await self.state.ask_holder(upload_id, "stop", LOCK_TTL_MS)
            await asyncio.sleep(_POLL_S)
            acquired = await self.state.acquire(upload_id, owner, LOCK_TTL_MS)
        upload, token = acquired
        lease = Lease(upload_id, token)
        self._leases.add(lease)
        renewer = asyncio.create_task(self._renew(lease))
        try:
            yield upload, lease
        finally:
            self._leases.discard(lease)
            await cancel_and_wait(renewer)
            if not lease.released:
                await asyncio.shield(self._release(lease))

    async def _release(self, lease: Lease) -> None:
        try:
            await self.state.release(lease.upload_id, lease.token)
        except Exception:  # the lock expires by itself within seconds
            log.warning("could not release the lock of %s", lease.upload_id, exc_info=True)

    async def _renew(self, lease: Lease) -> None:
        """Every ~100 ms: extend the lock and answer requests from other requests."""
        while not was_cancelled():
            await asyncio.sleep(RENEW_INTERVAL_S)
            if lease.released or was_cancelled():
                return
            try:
                request = await self.state.renew(lease.upload_id, lease.token, LOCK_TTL_MS)
            except LockLost:
                lease.lost = True
                lease.wake_reader(LockLost())
                return
            except Exception:  # Redis unreachable: stop writing before the lock can expire
                if time.monotonic() - lease.renewed_at > LOCK_TTL_MS / 2000:
                    lease.lost = True
                    lease.wake_reader(LockLost())
                    return
                continue
            lease.renewed_at = time.monotonic()
            if request == "stop":
                lease.stop_requested = True
                lease.wake_reader(TakenOver())
            elif request.startswith("commit:") and lease.session is not None:
                with contextlib.suppress(Exception):
                    await lease.session.commit(ack=request.removeprefix("commit:"))

    # -- writing ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def writing(self, upload_id: str, owner: str) -> AsyncIterator[AppendSession]:
        """Lock the upload and open its file for appending at the committed offset. If the
        file is shorter than that offset, the offset goes back to the file's size first."""
        async with self.locked(upload_id, owner) as (upload, lease):
            if upload.status != "uploading":  # nothing to open: any byte is past the length
                yield AppendSession(self, upload, lease, None)
                return
            file, start = await self.storage.open_for_append(upload_id, upload.offset)
            try:
                if start < upload.offset:
                    log.warning("upload %s: file shorter than its offset, rewinding", upload_id)
                    upload = await self.state.commit(
                        upload, lease.token, start, now=time.time(),
                        expires_at=self.expiry_for("uploading", time.time()),
                    )  # fmt: skip
                session = AppendSession(self, upload, lease, file)
                lease.session = session
                yield session
            finally:
                lease.session = None
                await file.close()

    async def concatenate(
        self,
        *,
        owner: str,
        partial_ids: list[str],
        metadata: str,
        url_of: str,
        max_bytes: int | None,
    ) -> Upload:
        """Create a final upload from complete partial uploads of `owner`, locked in a fixed
        order (they live in different shards). 400 for unknown, foreign, unfinished or
        non-partial uploads."""
        for partial_id in partial_ids:  # refuse early, without touching a running upload
            try:
                _check_partial(partial_id, await self.state.get(partial_id, owner))
            except (UploadNotFound, UploadGone):
                raise BadRequest(f"partial upload {partial_id} does not exist") from None
        async with contextlib.AsyncExitStack() as stack:
            partials: dict[str, Upload] = {}
            for partial_id in sorted(set(partial_ids)):
                try:
                    partial, _lease = await stack.enter_async_context(
                        self.locked(partial_id, owner, takeover=False)
                    )
                except (UploadNotFound, UploadGone):
                    raise BadRequest(f"partial upload {partial_id} does not exist") from None
                partials[partial_id] = _check_partial(partial_id, partial)
            parts = [(pid, partials[pid].length or 0) for pid in partial_ids]
            length = sum(part_length for _, part_length in parts)
            if max_bytes is not None and length > max_bytes:
                raise PayloadTooLarge(f"the final upload would pass {max_bytes} bytes")
            final_id = new_upload_id()
            await self.storage.concatenate(final_id, parts)
            sha256 = await self.storage.sha256(final_id, length)
            now = time.time()
            final = Upload(
                upload_id=final_id, owner=owner, offset=length, length=length,
                metadata=metadata, status="completed", created_at=now,
                expires_at=self.expiry_for("completed", now),
                url=url_of.replace("{id}", final_id),
                concat="final;" + " ".join(partial_ids), sha256=sha256,
            )  # fmt: skip
            await self.state.create(final, path=self.storage.relative_path(final_id))
            return final

    def finish_in_background(self, upload: Upload) -> None:
        """Hash a `received` upload's file and mark it `completed`, off the request."""
        task = asyncio.create_task(self._finish_logged(upload))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _finish_logged(self, upload: Upload) -> None:
        try:
            await self.finish(upload)
        except Exception:  # the sweeper hashes it later
            log.warning("could not hash upload %s yet", upload.upload_id, exc_info=True)

    async def finish(self, upload: Upload) -> None:
        """Hash the file once after its last byte and record the SHA-256 (completed event)."""
        assert upload.length is not None
        sha256 = await self.storage.sha256(upload.upload_id, upload.length)
        now = time.time()
        await self.state.complete(
            upload, sha256, now=now, expires_at=self.expiry_for("completed", now),
            path=self.storage.relative_path(upload.upload_id),
        )  # fmt: skip

    def stop_writers(self) -> None:
        """Graceful shutdown: every running PATCH commits what it has and answers 503."""
        self.is_stopping = True
        for lease in list(self._leases):
            lease.wake_reader(ShuttingDown())

    async def close(self) -> None:
        for task in list(self._background):
            await cancel_and_wait(task)


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


def _check_partial(partial_id: str, partial: Upload) -> Upload:
    """The partial upload, if a final upload may be built from it (400 otherwise)."""
    if not partial.is_partial:
        raise BadRequest(f"upload {partial_id} is not a partial upload")
    if partial.status == "uploading":
        raise BadRequest(f"partial upload {partial_id} is not complete")
    return partial


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
            if self.may_commit:
                await self._flush()
            upload = self.upload
            new_offset = self.written if self.may_commit else upload.offset
            is_last = upload.length is not None and new_offset == upload.length
            fsync = self.uploads.settings.fsync
            needs_sync = fsync == "always" or (is_last and fsync != "never")
            if new_offset > self.synced and needs_sync and self.file is not None:
                await self.file.sync()
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
        loop = asyncio.get_running_loop()
        idle = uploads.settings.idle_timeout_s
        try:
            # The stall deadline covers waiting for the client only, never our own writes.
            async with asyncio.timeout(loop.time() + idle) as stall:
                while chunk := await body.readany():
                    self._gather(chunk, max_bytes)
                    if self.lease.stop_requested or self.lease.lost:
                        raise TakenOver()
                    is_due = time.monotonic() - self.committed_at > COMMIT_INTERVAL_S
                    if self.pending_bytes >= WRITE_BLOCK_BYTES or (is_due and self.may_commit):
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
            if isinstance(stop, TimeoutError):
                raise RequestTimeout(
                    f"the body stalled for {idle:g} s; {self.upload.offset} bytes are committed"
                ) from None
            if isinstance(stop, ShuttingDown):
                raise ServiceUnavailable(
                    f"the server is restarting; {self.upload.offset} bytes are committed", 2
                ) from None
            if isinstance(stop, LockLost):
                raise ServiceUnavailable("lost the upload's lock; retry", 1) from None
            raise Interrupted(self.upload.offset) from None
        except Exception:  # the client hung up or sent a broken body: keep what arrived
            await self._settle_write(quietly=True)
            await self._keep_what_arrived()
            raise BodyIncomplete(
                f"the request body ended early; {self.upload.offset} bytes are committed"
            ) from None

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

    async def _flush(self) -> None:
        if not self.pending or self.file is None:
            return
        chunks, size = self.pending, self.pending_bytes
        self.pending, self.pending_bytes = [], 0  # the reader goes on gathering meanwhile
        try:
            await self.file.write(self.written, chunks, self.hashes)
        except BaseException:
            self.pending, self.pending_bytes = chunks + self.pending, size + self.pending_bytes
            # the thread may have written and hashed some of them: the file is hashed later
            if self.running_hash is not None:
                self.hashes.remove(self.running_hash)
                self.running_hash = None
            raise
        self.written += size

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
