"""Batches: a folder of files that the parent hears about once, when all of it is there.

A client opens a batch (`POST <endpoint>batches`) or just names one in its uploads' metadata
(`batch`); each upload joins it with its relative path as it is created (`Uploads.admit`).
The batch completes, exactly once, in the Redis step that completes its last member
(store/batches.py). This module is the rest of a batch's life: open, read, seal, terminate,
expire.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from tusserver import batching, randomness
from tusserver.auth import BatchQuota
from tusserver.errors import BadRequest, Forbidden, UploadGone, UploadNotFound
from tusserver.store.batches import NO_SUCH_BATCH, Batch, BatchState
from tusserver.store.records import SHARD_COUNT, Upload
from tusserver.uploads.admission import batch_url
from tusserver.uploads.lease import LOCK_TTL_MS
from tusserver.uploads.service import Uploads

log = logging.getLogger("tusserver.uploads.batches")

POSTPONE_MARGIN_S = 1.0  # look at a batch again this long after its last member's expiry


@dataclass(frozen=True)
class Member:
    """A path of a batch and the upload that holds it now (None once that upload is gone)."""

    path: str
    upload_id: str
    upload: Upload | None


@dataclass(frozen=True)
class BatchView:
    """A batch with its members as they are now."""

    batch: Batch
    members: list[Member]

    @property
    def bytes_received(self) -> int:
        return sum(m.upload.offset for m in self.members if m.upload is not None)


class Batches:
    """The batches of one process, on its upload service."""

    def __init__(self, uploads: Uploads) -> None:
        self.uploads = uploads
        self.state: BatchState = uploads.batch_state

    async def open(
        self,
        owner: str,
        name: str | None,
        *,
        files: int | None,
        total_bytes: int | None,
        metadata: str,
        url_of: str,
        quota: BatchQuota,
    ) -> BatchView:
        """Open a batch that expects `files` files, `total_bytes` bytes, or both (it
        completes when all it expects is complete), or neither (it completes when sealed).
        Named by the client, else by the token, else at random. 400 for bad numbers, 403
        past the token's limits, 409 if the name is taken."""
        if name is None:
            name = quota.name or randomness.token_hex(16)
        name = batching.parse_batch_name(name)
        if quota.name is not None and quota.name != name:
            raise Forbidden("this token opens only its own batch")
        for count, what in ((files, "files"), (total_bytes, "bytes")):
            if count is not None and count < 1:
                raise BadRequest(f"a batch's {what} must be at least 1")
        if files is not None and files > self.state.max_files:
            raise BadRequest(f"a batch may have at most {self.state.max_files} files")
        if files is not None and quota.max_files is not None and files > quota.max_files:
            raise Forbidden("this token allows fewer files in its batch")
        if total_bytes is not None and quota.max_bytes is not None:
            if total_bytes > quota.max_bytes:
                raise Forbidden("this token allows fewer bytes in its batch")
        lifetimes = self.uploads.lifetimes
        now = time.time()
        await self.state.open(
            owner, name, now=now, expires_at=now + lifetimes.expire_after_s,
            url=batch_url(url_of, name), retention_s=lifetimes.retention_s,
            files=files, total_bytes=total_bytes, metadata=metadata,
        )  # fmt: skip
        return await self.view(owner, name)

    async def view(self, owner: str, name: str) -> BatchView:
        """The batch `name` of `owner` and each member's upload as committed (400 for a
        name no batch can have, 404 for no batch)."""
        batch = await self.state.get(owner, batching.parse_batch_name(name))
        paths = sorted(batch.paths.items())
        uploads = await self.uploads.state.get_many([upload_id for _, (upload_id, _) in paths])
        members = [
            Member(
                path, upload_id, upload if upload is not None and upload.owner == owner else None
            )
            for (path, (upload_id, _length)), upload in zip(paths, uploads, strict=True)
        ]
        return BatchView(batch, members)

    async def members(self, owner: str, name: str) -> list[Upload]:
        """The uploads that hold the batch's paths now, oldest first (404 for no batch)."""
        view = await self.view(owner, name)
        found = [m.upload for m in view.members if m.upload is not None]
        return sorted(found, key=lambda upload: (upload.created_at, upload.upload_id))

    async def seal(self, owner: str, name: str) -> BatchView:
        """No more files: the batch completes once the files it has are complete (which may
        be now). Sealing again changes nothing."""
        await self.state.seal(owner, batching.parse_batch_name(name), time.time())
        return await self.view(owner, name)

    async def terminate(self, owner: str, name: str) -> int:
        """Delete the batch (its `batch.terminated` event) and terminate every member: how
        many members were removed. 400 for a bad name, 404 for no batch."""
        batch = await self.state.get(owner, batching.parse_batch_name(name))
        upload_ids = await self.state.remove(batch.key, "terminated", now=time.time(), owner=owner)
        if upload_ids is None:
            raise UploadNotFound(NO_SUCH_BATCH)
        removed = 0
        for upload_id in upload_ids:
            try:
                await self.uploads.terminate(upload_id, owner)
                removed += 1
            except (UploadNotFound, UploadGone):
                pass  # removed already (terminated alone, or expired)
        return removed

    # -- expiry (the sweeper) --------------------------------------------------------------

    async def sweep(self, now: float) -> int:
        """Act on every batch whose time has come: how many were removed."""
        removed = 0
        for shard in range(SHARD_COUNT):
            for key in await self.state.due(shard, now):
                removed += await self.expire(key, now)
        return removed

    async def expire(self, key: str, now: float) -> bool:
        """A batch whose time came: one that is not complete waits while a member still
        uploads (until that member's own expiry), then goes with every member it has, the
        completed ones too (`expired` events, and `batch.expired`); a complete batch whose
        --retention passed goes alone (its members follow their own retention)."""
        batch = await self.state.get_any(key)
        if batch is None:
            await self.state.remove(key, "expired", now=now, expired_before=now)
            return False
        if batch.status != "completed":
            alive = await self.uploads.state.get_many([uid for uid, _ in batch.paths.values()])
            latest = max(
                (u.expires_at or now for u in alive if u is not None and u.status != "completed"),
                default=None,
            )
            if latest is not None and latest > now:
                await self.state.postpone(key, latest + POSTPONE_MARGIN_S)
                return False
        upload_ids = await self.state.remove(key, "expired", now=now, expired_before=now)
        if upload_ids is None:
            return False
        if batch.status != "completed":
            for upload_id in upload_ids:
                await self._expire_member(upload_id, now)
        return True

    async def _expire_member(self, upload_id: str, now: float) -> None:
        """Remove a member of an expired batch, unless a request holds it (then it expires by
        itself, later)."""
        token = await self.uploads.state.try_lock(upload_id, LOCK_TTL_MS)
        if token is None:
            return
        try:
            upload = await self.uploads.state.get_any(upload_id)
            if upload is None:
                return
            if await self.uploads.state.remove(upload, "expired", now=now, lock_token=token):
                await self.uploads.storage.delete(upload_id)
        finally:
            await self.uploads.state.release(upload_id, token)
