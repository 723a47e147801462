"""What a handler asks of an upload, composed of `state` (Redis) and `storage` (disk).

Locks are held through a `Lease` whose renew task listens for requests from other requests
(stop, or commit now) and passes them to the running `AppendSession` (appending.py).
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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from aiohttp import StreamReader

from tusserver.errors import (
    BadRequest,
    PayloadTooLarge,
    ServiceUnavailable,
    TusError,
    UploadGone,
    UploadLocked,
    UploadNotFound,
)
from tusserver.files.storage import Storage
from tusserver.protocol import Checksum
from tusserver.settings import Settings
from tusserver.store.client import connect as connect_redis
from tusserver.store.records import Upload, new_upload_id

__all__ = ["NewUpload", "Upload", "Uploads", "open_uploads"]
from tusserver.store.state import LockLost, UploadState
from tusserver.tasks import cancel_and_wait, was_cancelled
from tusserver.uploads.append import (
    AppendSession,
    BodyMemory,
    Lease,
    ShuttingDown,
    TakenOver,
    read_small_body,
    refusal_for,
    verified_small_body,
)

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

log = logging.getLogger("tusserver.uploads.service")

LOCK_TTL_MS = 3000
# Renewals extend the lock only when less than this is left: one write every ~0.5 s instead
# of every 100 ms (with `appendfsync always` each write costs Valkey an AOF fsync, and every
# reply of that turn waits for it), while the lock keeps at least 2.4 s in hand.
LOCK_EXTEND_BELOW_MS = 2500
RENEW_INTERVAL_S = 0.1
TAKEOVER_WAIT_S = 1.0
RECEIVED_GRACE_S = 60.0  # a `received` upload not completed by then is hashed by the sweeper
_POLL_S = 0.02
# Creation-with-upload bodies up to this size are read whole, then stored with the new upload
# in one thread hop and one Redis step (measured: benchmarks/README.md, scenario d).
SMALL_BODY_BYTES = 64 * 2**10


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


@dataclass(frozen=True)
class NewUpload:
    """What a creation request asks for (checked by the handler)."""

    owner: str
    length: int | None  # None: deferred
    metadata: str  # the Upload-Metadata header as stored
    concat: str  # "partial" or ""
    url_of: str  # the upload URL with "{id}" for its id


class Uploads:
    """The upload service of one process."""

    def __init__(self, state: UploadState, storage: Storage, settings: Settings) -> None:
        self.state = state
        self.storage = storage
        self.settings = settings
        self.hashes = RunningHashes()
        self.body_memory = BodyMemory(settings.body_memory_bytes)
        self._background: set[asyncio.Task[None]] = set()
        self._leases: set[Lease] = set()
        self._small_bodies: set[StreamReader] = set()  # small creations reading their body
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

    async def create(self, new: NewUpload) -> Upload:
        """Create the upload's file and state; an empty upload is complete at once."""
        upload = self._new_upload(new)
        await self.storage.create(upload.upload_id)
        await self.state.create(upload, path=self.storage.relative_path(upload.upload_id))
        return upload

    @contextlib.asynccontextmanager
    async def creating(self, new: NewUpload) -> AsyncIterator[AppendSession]:
        """`create` for a creation with upload: the file is created open and the state is
        stored locked by this request in the same steps, so the body goes straight on."""
        if self.is_stopping:
            raise ServiceUnavailable("the server is restarting; retry shortly", 2)
        upload = self._new_upload(new)
        file = await self.storage.create_for_append(upload.upload_id)
        try:
            token = self.state.new_lock_token()
            path = self.storage.relative_path(upload.upload_id)
            await self.state.create(upload, path=path, lock_token=token, ttl_ms=LOCK_TTL_MS)
            async with self._leased(upload.upload_id, token) as lease:
                is_open = upload.status == "uploading"
                session = AppendSession(self, upload, lease, file if is_open else None)
                lease.session = session
                yield session
        finally:
            await file.close()

    @staticmethod
    def is_small_body(content_length: int | None) -> bool:
        """A body of known size, at most SMALL_BODY_BYTES: read whole, then written in one
        thread hop (`create_with_body`, `AppendSession.append_small`)."""
        return content_length is not None and 0 < content_length <= SMALL_BODY_BYTES

    def fits_in_one_step(
        self, length: int | None, content_length: int | None, max_bytes: int | None
    ) -> bool:
        """Whether a creation-with-upload body is small enough for `create_with_body`: a
        small body within the upload's length (or, with the length deferred, within
        `max_bytes`). Other bodies stream through `creating`."""
        limit = length if length is not None else max_bytes
        if not self.is_small_body(content_length):
            return False
        assert content_length is not None
        return limit is None or content_length <= limit

    async def create_with_body(
        self, new: NewUpload, body: StreamReader, size: int, checksum: Checksum | None
    ) -> tuple[Upload, TusError | None]:
        """Creation with a small upload body (see `fits_in_one_step`): read the body, then
        create the file holding it (durable per --fsync) and the state at its offset in one
        Redis step; a body that is the whole upload is `completed` at once, with its SHA-256
        and events. Returns the upload and, if not all of the body could be kept, the
        refusal to answer with (the upload exists; the client may resume it): 400 for a
        hang-up, 408 for a stall, 503 when the server stops meanwhile (all three keep what
        arrived, unless checksummed), 460 for a checksum mismatch (keeps nothing). Raises
        507/500 (no upload is created) and 503 (the server is stopping: none)."""
        if self.is_stopping:
            raise ServiceUnavailable("the server is restarting; retry shortly", 2)
        idle = self.settings.idle_timeout_s
        self._small_bodies.add(body)
        try:
            data, stop = await read_small_body(body, size, idle)
        finally:
            self._small_bodies.discard(body)
        data, mismatch = verified_small_body(data, stop, checksum)
        upload = self._new_upload(new)
        running = hashlib.sha256(data)
        is_whole = upload.length == len(data)
        status: Literal["uploading", "completed"] = "completed" if is_whole else "uploading"
        upload = replace(
            upload, offset=len(data), status=status,
            sha256=running.hexdigest() if is_whole else "",
            expires_at=self.expiry_for(status, upload.created_at),
        )  # fmt: skip
        sync = bool(data) and self.storage.must_sync(completes=is_whole)
        await self.storage.create_holding(upload.upload_id, data, sync=sync)
        await self.state.create(upload, path=self.storage.relative_path(upload.upload_id))
        if data and not is_whole:
            self.hashes.keep(upload.upload_id, upload.offset, running)
        if mismatch is not None or stop is None:
            return upload, mismatch
        return upload, refusal_for(stop, upload.offset, idle)

    def _new_upload(self, new: NewUpload) -> Upload:
        upload_id = new_upload_id()
        now = time.time()
        empty = new.length == 0
        return Upload(
            upload_id=upload_id,
            owner=new.owner,
            offset=0,
            length=new.length,
            metadata=new.metadata,
            status="completed" if empty else "uploading",
            created_at=now,
            expires_at=self.expiry_for("completed" if empty else "uploading", now),
            url=new.url_of.replace("{id}", upload_id),
            concat=new.concat,
            sha256=hashlib.sha256().hexdigest() if empty else "",
        )

    async def current(self, upload_id: str, owner: str) -> Upload:
        """The upload as committed now: a running PATCH is asked to commit what it has first
        (waiting at most about a second). 404/410 inside."""
        nonce = secrets.token_hex(6)
        upload, asked = await self.state.read(
            upload_id, owner, ask=f"commit:{nonce}", ttl_ms=LOCK_TTL_MS
        )
        if not asked:
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
        async with self._leased(upload_id, token) as lease:
            yield upload, lease

    @contextlib.asynccontextmanager
    async def _leased(self, upload_id: str, token: str) -> AsyncIterator[Lease]:
        """Keep the lock held with `token` renewed until the block ends, then release it."""
        lease = Lease(upload_id, token)
        self._leases.add(lease)
        renewer = asyncio.create_task(self._renew(lease))
        try:
            yield lease
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
        """Every ~100 ms: keep the lock (extending it every ~0.5 s) and answer requests
        from other requests."""
        while not was_cancelled():
            await asyncio.sleep(RENEW_INTERVAL_S)
            if lease.released or was_cancelled():
                return
            try:
                request = await self.state.renew(
                    lease.upload_id, lease.token, LOCK_TTL_MS,
                    extend_below_ms=LOCK_EXTEND_BELOW_MS,
                )  # fmt: skip
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
    async def writing(
        self, upload_id: str, owner: str, *, small_body: bool = False
    ) -> AsyncIterator[AppendSession]:
        """Lock the upload and open its file for appending at the committed offset. If the
        file is shorter than that offset, the offset goes back to the file's size first.
        With `small_body` the file is not opened here: `AppendSession.append_small` opens,
        writes and closes it in one thread hop."""
        async with self.locked(upload_id, owner) as (upload, lease):
            if upload.status != "uploading" or small_body:
                yield AppendSession(self, upload, lease, None)
                return
            file, start = await self.storage.open_for_append(upload_id, upload.offset)
            try:
                session = AppendSession(self, upload, lease, file)
                if start < upload.offset:
                    log.warning("upload %s: file shorter than its offset, rewinding", upload_id)
                    await session.commit_offset(start)
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
        """Graceful shutdown: every running PATCH, and every small creation still reading its
        body, keeps what arrived and answers 503."""
        self.is_stopping = True
        for lease in list(self._leases):
            lease.wake_reader(ShuttingDown())
        for body in list(self._small_bodies):
            if body.exception() is None:
                body.set_exception(ShuttingDown())

    async def ping(self) -> None:
        """Raises a Redis error when the state store does not answer."""
        await self.state.ping()

    async def close(self) -> None:
        for task in list(self._background):
            await cancel_and_wait(task)


@contextlib.asynccontextmanager
async def open_uploads(settings: Settings, redis_url: str) -> AsyncIterator[Uploads]:
    """The upload service of this process on the Redis at `redis_url` and the data directory
    of `settings`, checked (shard layout, folders) before it is handed out; closed after."""
    client = await connect_redis(redis_url)
    try:
        state = UploadState(client, tombstone_ttl_s=settings.tombstone_ttl_s)
        await state.check_layout()
        storage = Storage(
            settings.data_dir,
            fsync=settings.fsync,
            min_free_disk_bytes=settings.min_free_disk_bytes,
        )
        storage.prepare()
        uploads = Uploads(state, storage, settings)
        try:
            yield uploads
        finally:
            await uploads.close()
            storage.close()
    finally:
        await client.aclose()


def _check_partial(partial_id: str, partial: Upload) -> Upload:
    """The partial upload, if a final upload may be built from it (400 otherwise)."""
    if not partial.is_partial:
        raise BadRequest(f"upload {partial_id} is not a partial upload")
    if partial.status == "uploading":
        raise BadRequest(f"partial upload {partial_id} is not complete")
    return partial
