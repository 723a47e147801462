"""The upload service handlers call, composed of the Redis steps (`store`) and the files
(`files`): create, append, read, list, terminate, concatenate, finish and expire uploads.

`create` and `append` take the request's body as it is and choose the way to write it
themselves (a small body in one step, a long one streamed; `append.AppendSession`); locks
live in `lease.Leases`. Every change of an upload's life goes state first, then file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from aiohttp import StreamReader

from tusserver import randomness
from tusserver.auth import EXPIRED
from tusserver.errors import (
    PayloadTooLarge,
    TusError,
    Unauthorized,
    UploadGone,
    UploadNotFound,
)
from tusserver.files.storage import Storage
from tusserver.settings import Settings
from tusserver.store.aof import AofSync, already_durable, kept_up
from tusserver.store.batches import BatchState
from tusserver.store.client import check_layout, connections
from tusserver.store.records import Upload, new_upload_id
from tusserver.store.state import UploadState
from tusserver.tasks import cancel_and_wait
from tusserver.uploads import admission
from tusserver.uploads.admission import NewUpload
from tusserver.uploads.append import AppendContext, AppendSession
from tusserver.uploads.body import (
    Body,
    BodyMemory,
    ShuttingDown,
    SizeLimit,
    read_small_body,
    refusal_for,
    verified_small_body,
)
from tusserver.uploads.hashing import RunningHashes
from tusserver.uploads.lease import LOCK_TTL_MS, POLL_S, TAKEOVER_WAIT_S, CountLock, Leases
from tusserver.uploads.lifetimes import RECEIVED_GRACE_S, Lifetimes

__all__ = [
    "Body",
    "NewUpload",
    "Observers",
    "Readiness",
    "SizeLimit",
    "Upload",
    "Uploads",
    "open_uploads",
]

log = logging.getLogger("tusserver.uploads")
READY_REDIS_TIMEOUT_S = 1.0  # /ready: a Redis slower than this is as good as down
# Uploads one process creates at once (the file, then the record); more wait their turn, in
# order, so a burst of creations (2,000 phones at once) does not hold back the uploads under
# way (benchmarks/README.md, scenario h).
CREATIONS_AT_ONCE = 32


@dataclass(frozen=True)
class Observers:
    """Who hears what the service does (the metrics, in the HTTP layer, listen): plain
    callbacks, each a no-op unless given, so nothing here calls up a layer."""

    # (event, committed_bytes): created, completed, terminated, expired; "" for bytes
    upload: Callable[[str, int], None] = lambda _event, _committed_bytes: None
    lock: CountLock = lambda _outcome: None  # lease.CountLock
    # +1 / -1 around each body being written
    in_flight: Callable[[int], None] = lambda _change: None
    # each streamed body, as it starts: read in a "thread" (files/receive.py) or on the
    # "event_loop" (smaller, under TLS, or every receiving thread busy)
    streamed: Callable[[str], None] = lambda _way: None


@dataclass(frozen=True)
class Created:
    """A new upload and, when not all of the creation's body could be kept, the refusal to
    answer with: the upload exists, so the client may resume it."""

    upload: Upload
    refusal: TusError | None = None


@dataclass(frozen=True)
class Readiness:
    """The checks of `Uploads.readiness`: each name with "ok" or why it failed."""

    checks: dict[str, str]

    @property
    def is_ready(self) -> bool:
        return all(outcome == "ok" for outcome in self.checks.values())

    @property
    def failed(self) -> list[str]:
        return [name for name, outcome in self.checks.items() if outcome != "ok"]


class Uploads:
    """The upload service of one process."""

    def __init__(
        self,
        state: UploadState,
        storage: Storage,
        settings: Settings,
        batch_state: BatchState,
        observers: Observers = Observers(),
        aof: AofSync | None = None,
    ) -> None:
        self.state = state
        self.aof = aof  # the embedded Valkey's AOF, synced by this process (store/aof.py)
        self.batch_state = batch_state
        self.storage = storage
        self.lifetimes = Lifetimes.of(settings)
        self.idle_timeout_s = settings.idle_timeout_s
        self.orphan_grace_s = settings.orphan_grace_s
        self.hashes = RunningHashes()
        self.body_memory = BodyMemory(settings.body_memory_bytes)
        self.leases = Leases(state, observers.lock)
        self.count_in_flight = observers.in_flight
        self._appending = AppendContext(
            state=state,
            storage=storage,
            hashes=self.hashes,
            body_memory=self.body_memory,
            lifetimes=self.lifetimes,
            idle_timeout_s=settings.idle_timeout_s,
            finish_later=self.finish_in_background,
            count_in_flight=observers.in_flight,
            count_streamed=observers.streamed,
            direct_body_bytes=settings.receive_min_bytes,
        )
        self._background: set[asyncio.Task[None]] = set()
        self._small_bodies: set[StreamReader] = set()  # small creations reading their body
        self.creating = asyncio.Semaphore(CREATIONS_AT_ONCE)  # not a body's transfer
        self.is_draining = False

    # -- create ----------------------------------------------------------------------------

    async def create(self, new: NewUpload, body: Body | None, limit: SizeLimit) -> Created:
        """Create an upload, with the body's bytes when there is one: a small body that fits
        is read whole, then stored with the new upload in one thread hop and one Redis step;
        a longer one streams onto the new upload's file. An upload whose length is 0, or
        whose body is all of it, is `completed` at once with its SHA-256 and events. Raises
        507/500 (nothing is created) and 503 (the server is stopping); a body that stops
        early or fails its checks comes back as `Created.refusal` (see AppendSession.append).
        A body of known size that cannot fit is refused (413) before anything is created."""
        self.leases.refuse_if_stopping()
        if body is not None and body.content_length is not None:  # refused before creating
            if new.length is not None and body.content_length > new.length:
                raise PayloadTooLarge("the body would run past Upload-Length")
            limit.check(body.content_length, "the body")
        new = await self.admit(new)
        if body is None:
            upload = self._new_upload(new)
            async with self.creating:
                await self.storage.create(upload.upload_id)
                await self.state.create(upload)
            return Created(upload)
        room = new.length if new.length is not None else limit.room_bytes
        fits = body.content_length is not None and (room is None or body.content_length <= room)
        if body.is_small and fits:
            return await self._create_with_small_body(new, body)
        return await self._create_streaming(new, body, limit)

    async def _create_streaming(self, new: NewUpload, body: Body, limit: SizeLimit) -> Created:
        """The file is created open and the state stored locked by this request in the same
        steps, so the body goes straight on."""
        upload = self._new_upload(new)
        token = self.state.new_lock_token()
        async with self.creating:
            file = await self.storage.create_for_append(upload.upload_id)
            try:
                await self.state.create(upload, lock_token=token, ttl_ms=LOCK_TTL_MS)
            except BaseException:
                await file.close()
                raise
        async with self.leases.held(upload.upload_id, token) as lease:
            session = AppendSession(self._appending, upload, lease, file)
            try:
                return Created(await session.append(body, limit))
            except TusError as refusal:
                return Created(session.upload, refusal)
            finally:
                await session.close()

    async def _create_with_small_body(self, new: NewUpload, body: Body) -> Created:
        """Read the body, then create the file holding it (durable per --fsync) and the state
        at its offset in one Redis step. What arrived of a body that stops early is kept (not
        if checksummed); a checksum mismatch keeps nothing (460)."""
        assert body.content_length is not None
        await body.before_reading()
        self._small_bodies.add(body.stream)
        self.count_in_flight(1)
        try:
            data, stop = await read_small_body(
                body.stream, body.content_length, self.idle_timeout_s
            )
        finally:
            self.count_in_flight(-1)
            self._small_bodies.discard(body.stream)
        data, mismatch = verified_small_body(data, stop, body.checksum)
        upload = self._new_upload(new)
        running = hashlib.sha256(data)
        is_whole = upload.length == len(data)
        status: Literal["uploading", "completed"] = "completed" if is_whole else "uploading"
        upload = replace(
            upload, offset=len(data), status=status,
            sha256=running.hexdigest() if is_whole else "",
            expires_at=self.lifetimes.expires_at(status, upload.created_at),
        )  # fmt: skip
        sync = bool(data) and self.storage.must_sync(completes=is_whole)
        async with self.creating:
            await self.storage.create_holding(upload.upload_id, data, sync=sync)
            await self.state.create(upload)
        if data and not is_whole:
            self.hashes.keep(upload.upload_id, upload.offset, running)
        if mismatch is not None or stop is None:
            return Created(upload, mismatch)
        return Created(upload, refusal_for(stop, upload.offset, self.idle_timeout_s))

    @staticmethod
    def new_id(owner: str = "", metadata: str = "") -> str:
        """A fresh upload id (in the shard of the batch `metadata` names: admission.new_id)."""
        return admission.new_id(owner, metadata)

    async def admit(self, new: NewUpload) -> NewUpload:
        """`new`, joined to the batch its metadata names (admission.admit)."""
        return await admission.admit(self.batch_state, self.lifetimes, new)

    def _new_upload(self, new: NewUpload) -> Upload:
        upload_id = new.upload_id or new_upload_id()
        now = time.time()
        status: Literal["uploading", "completed"] = "completed" if new.length == 0 else "uploading"
        return Upload(
            upload_id=upload_id,
            owner=new.owner,
            offset=0,
            length=new.length,
            metadata=new.metadata,
            status=status,
            created_at=now,
            expires_at=self.lifetimes.expires_at(status, now),
            url=new.url_of.replace("{id}", upload_id),
            concat=new.concat,
            sha256=hashlib.sha256().hexdigest() if status == "completed" else "",
            created_by=new.created_by,
            batch=new.batch,
            batch_path=new.batch_path,
            checkpoint_at=now,
        )

    # -- append ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def writing(
        self, upload_id: str, owner: str, *, finishing: str | None = None
    ) -> AsyncIterator[AppendSession]:
        """Lock the upload (taking it from a running request; 404/410/423) for one append:
        the handler checks the request against `session.upload`, then calls
        `session.append(body, limit)`, which chooses how to write. `finishing`: see
        `check_finishing`, done before any running request is disturbed and again under the
        lock."""
        await self.check_finishing(upload_id, owner, finishing)
        async with self.leases.locked(upload_id, owner) as (upload, lease):
            _check_finisher(upload, finishing)
            session = AppendSession(self._appending, upload, lease)
            try:
                yield session
            finally:
                await session.close()

    # -- read ------------------------------------------------------------------------------

    async def get(self, upload_id: str, owner: str) -> Upload:
        """The upload as stored (404 for unknown ids and other owners, 410 for its owner
        while a tombstone lasts)."""
        return await self.state.get(upload_id, owner)

    async def check_finishing(self, upload_id: str, owner: str, finishing: str | None) -> None:
        """For a request whose token is past its `exp` but may finish what it created
        (`finishing`: that token's digest; None for a valid token, which passes): 401 token
        expired unless the upload was created by that very token and is still uploading. An
        unknown or gone upload is 401 too: an expired token learns nothing."""
        if finishing is None:
            return
        try:
            upload = await self.state.get(upload_id, owner)
        except (UploadNotFound, UploadGone):
            raise Unauthorized(EXPIRED) from None
        _check_finisher(upload, finishing)

    async def current(self, upload_id: str, owner: str, *, finishing: str | None = None) -> Upload:
        """The upload as committed now: a running PATCH is asked to commit what it has first
        (waiting at most about a second). 404/410 inside; `finishing` as `check_finishing`."""
        await self.check_finishing(upload_id, owner, finishing)
        nonce = randomness.token_hex(6)
        upload, asked = await self.state.read(
            upload_id, owner, ask=f"commit:{nonce}", ttl_ms=LOCK_TTL_MS
        )
        if not asked:
            return upload
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_S)
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

    # -- remove ----------------------------------------------------------------------------

    async def terminate(self, upload_id: str, owner: str, *, finishing: str | None = None) -> None:
        """Delete the upload, taking it from any running PATCH; `finishing` as
        `check_finishing`."""
        await self.check_finishing(upload_id, owner, finishing)
        async with self.leases.locked(upload_id, owner) as (upload, lease):
            _check_finisher(upload, finishing)
            removed = await self.state.remove(
                upload, "terminated", now=time.time(), lock_token=lease.token
            )
        if removed:
            await self.storage.delete(upload_id)

    async def due(self, shard: int, now: float) -> list[Upload]:
        """Uploads of `shard` whose time in the expiry index has come (a batch of them)."""
        ids = await self.state.due(shard, now)
        found = [await self.state.get_any(upload_id) for upload_id in ids]
        return [upload for upload in found if upload is not None]

    async def expire(self, upload: Upload, now: float) -> bool:
        """Remove an upload whose time has come (never one a request holds or that was
        active again meanwhile); True if it was removed."""
        removed = await self.state.remove(upload, "expired", now=now, expired_before=now)
        if removed:
            await self.storage.delete(upload.upload_id)
        return removed

    # -- completion ------------------------------------------------------------------------

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
            upload, sha256, now=now, expires_at=self.lifetimes.expires_at("completed", now)
        )

    async def finish_received(self, upload_id: str, now: float) -> bool:
        """Hash a `received` upload whose process did not (it crashed or stopped), unless
        another process is at it; True if this call completed it."""
        token = await self.state.try_lock(upload_id, LOCK_TTL_MS * 20)
        if token is None:
            return False
        try:
            await self.state.postpone(upload_id, now + RECEIVED_GRACE_S)
            upload = await self.state.get_any(upload_id)
            if upload is None or upload.status != "received":
                return False
            await self.finish(upload)
            return True
        finally:
            await self.state.release(upload_id, token)

    # -- the process -----------------------------------------------------------------------

    @property
    def is_stopping(self) -> bool:
        return self.is_draining or self.leases.is_stopping

    def drain(self) -> None:
        """The process was asked to stop: /ready says so from now on, while requests are
        still served until the listener closes (`stop_writers` follows)."""
        self.is_draining = True

    def stop_writers(self) -> None:
        """Graceful shutdown: every running PATCH, and every small creation still reading its
        body, keeps what arrived and answers 503."""
        self.leases.stop_all()
        for stream in list(self._small_bodies):
            if stream.exception() is None:
                stream.set_exception(ShuttingDown())

    async def ping(self) -> None:
        """Raises a Redis error when the state store does not answer."""
        await self.state.ping()

    async def readiness(self) -> Readiness:
        """Whether this process should be sent uploads: not draining (answered at once,
        nothing else is checked), Redis answering within READY_REDIS_TIMEOUT_S, the data
        directory writable and more than --min-free-disk free."""
        if self.is_stopping:
            return Readiness({"stopping": "the server is shutting down"})
        checks = {"stopping": "ok", "redis": "ok"}
        try:
            await asyncio.wait_for(self.state.ping(), READY_REDIS_TIMEOUT_S)
        except TimeoutError:
            checks["redis"] = f"no answer within {READY_REDIS_TIMEOUT_S:g} s"
        except Exception as error:  # any failure to answer means not ready
            checks["redis"] = f"unreachable: {error}"
        if self.aof is not None and self.aof.failure:
            checks["redis"] = self.aof.failure
        return Readiness(checks | await self.storage.readiness())

    async def close(self) -> None:
        for task in list(self._background):
            await cancel_and_wait(task)
        await self.leases.close()


@contextlib.asynccontextmanager
async def open_uploads(
    settings: Settings,
    redis_url: str,
    observers: Observers = Observers(),
) -> AsyncIterator[Uploads]:
    """The upload service of this process on the Redis at `redis_url` and the data directory
    of `settings`, checked (shard layout, folders) before it is handed out; closed after.
    `observers` hear of upload events, committed bytes, lock contention and bodies being
    written."""
    async with contextlib.AsyncExitStack() as closing:
        redis = await closing.enter_async_context(connections(redis_url))
        aof = await closing.enter_async_context(kept_up(settings.own_aof_dir, redis.client))
        durable = already_durable if aof is None else aof.durable
        storage = Storage(
            settings.data_dir,
            fsync=settings.fsync,
            min_free_disk_bytes=settings.min_free_disk_bytes,
            receivers=settings.receive_threads,
        )
        await check_layout(redis.client)
        state = UploadState(
            redis.client,
            tombstone_ttl_s=settings.tombstone_ttl_s,
            path_of=storage.relative_path,
            observe=observers.upload,
            # under --fsync always, offsets reach the AOF only at checkpoints; otherwise every
            # commit may go there (the AOF reaches the disk once a second, unless a step waits)
            checkpoint_s=settings.offset_checkpoint_s if settings.fsync == "always" else 0.0,
            renew_client=redis.renewals,
            read_client=redis.reads,
            steps=redis.steps,
            durable=durable,
        )
        storage.prepare()
        batch_state = BatchState(redis.client, max_files=settings.max_batch_files, durable=durable)
        uploads = Uploads(state, storage, settings, batch_state, observers, aof)
        try:
            yield uploads
        finally:
            await uploads.close()
            storage.close()


def _check_finisher(upload: Upload, finishing: str | None) -> None:
    """401 token expired unless the request's token is valid (`finishing` is None), or it
    created `upload` and may finish it, and the upload is still uploading."""
    if finishing is None:
        return
    if not upload.created_by or upload.created_by != finishing or upload.status != "uploading":
        raise Unauthorized(EXPIRED)
