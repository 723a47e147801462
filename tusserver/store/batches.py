"""Batches in Redis: a set of uploads of one owner that completes once, as a whole.

A batch is stored under `batch_key_of(owner, name)` in that key's shard, and every member
upload gets an id in the same shard (`new_upload_id(shard)`): a member joins (JOIN) before
its upload is created, and its completion, counted by the same Lua step that completes the
upload (`lua.batch_member_done`), settles the batch, so the batch completes exactly once
and its `batch.completed` event is written with the change, as an upload's own events are,
on one shard of a Redis Cluster too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.commands.core import AsyncScript

from tusserver.auth import BatchQuota
from tusserver.errors import Conflict, Forbidden, PayloadTooLarge, UploadNotFound
from tusserver.protocol import current_request_id
from tusserver.store import batch_lua as lua
from tusserver.store.aof import Durable, already_durable
from tusserver.store.client import RedisClient
from tusserver.store.records import (
    BATCH_KINDS,
    as_text,
    batch_key_of,
    keys_of,
    new_upload_id,
    redis_key,
    shard_of,
)

BatchStatus = Literal["open", "sealed", "completed"]
NO_SUCH_BATCH = "no such batch"


@dataclass(frozen=True)
class Batch:
    """A batch's record."""

    key: str  # batch_key_of(owner, name)
    name: str
    owner: str
    status: BatchStatus
    url: str
    metadata: str  # Upload-Metadata form
    files_expected: int | None
    bytes_expected: int | None
    files: int  # paths registered
    done: int  # paths with a completed member
    done_bytes: int
    created_at: float
    completed_at: float | None
    expires_at: float | None
    # path -> (upload id, declared length or None)
    paths: Mapping[str, tuple[str, int | None]]

    @property
    def shard(self) -> int:
        return shard_of(self.key)


_JOIN_REFUSALS: Mapping[lua.Join, tuple[type[Exception], str]] = {
    lua.Join.CLOSED: (Conflict, "this batch is sealed or complete: it takes no more files"),
    lua.Join.PATH_DONE: (Conflict, "this path of the batch has a completed upload already"),
    lua.Join.TOO_MANY_FILES: (Conflict, "this batch has all the files it may have"),
    lua.Join.TOO_MANY_BYTES: (PayloadTooLarge, "this upload would pass the batch's byte count"),
    lua.Join.QUOTA_FILES: (Forbidden, "this token allows no more files in its batch"),
    lua.Join.QUOTA_BYTES: (Forbidden, "this token allows no more bytes in its batch"),
    lua.Join.NEEDS_LENGTH: (
        Conflict,
        "this batch counts bytes: its uploads need Upload-Length, not a deferred length",
    ),
}


class BatchState:
    """All Redis access of tusserver for batches."""

    def __init__(
        self,
        client: RedisClient,
        *,
        max_files: int,
        durable: Durable = already_durable,
    ) -> None:
        self.redis = client
        self.max_files = max_files
        # as UploadState's: awaited before a batch's creation, seal or removal is answered
        self._made_durable = durable
        self._open: AsyncScript = client.register_script(lua.BATCH_OPEN)
        self._join: AsyncScript = client.register_script(lua.JOIN)
        self._seal: AsyncScript = client.register_script(lua.SEAL)
        self._remove: AsyncScript = client.register_script(lua.BATCH_REMOVE)

    async def open(
        self,
        owner: str,
        name: str,
        *,
        now: float,
        expires_at: float,
        url: str,
        retention_s: float | None,
        files: int | None,
        total_bytes: int | None,
        metadata: str,
    ) -> str:
        """Create the batch `name` of `owner`; its key. 409 if it exists."""
        key = batch_key_of(owner, name)
        created = await self._open(
            keys=keys_of(key, "batch", "bexpiry"),
            args=[
                owner, name, f"{now:.6f}", f"{expires_at:.3f}", url, _optional(retention_s),
                _optional(files), _optional(total_bytes), metadata,
            ],
        )  # fmt: skip
        if lua.BatchOpen(int(created)) is lua.BatchOpen.EXISTS:
            raise Conflict("a batch of that name exists")
        await self._made_durable()
        return key

    async def join(
        self,
        owner: str,
        name: str,
        path: str,
        *,
        length: int | None,
        now: float,
        expires_at: float,
        url: str,
        retention_s: float | None,
        quota: BatchQuota,
        implicit: bool,
        upload_id: str = "",
    ) -> tuple[str, str]:
        """Register the upload that is about to be created for `path` in the batch (made now
        if `implicit` and there is none): the batch's key and the new upload's id (in the
        batch's shard: `upload_id` if given and there, else a new one). 404 (no batch of
        `owner`), 409, 413 or 403 as the batch and the token allow."""
        key = batch_key_of(owner, name)
        if not upload_id or shard_of(upload_id) != shard_of(key):
            upload_id = new_upload_id(shard_of(key))
        joined = await self._join(
            keys=keys_of(key, *BATCH_KINDS),
            args=[
                owner, name, path, upload_id, _optional(length), f"{now:.6f}",
                "1" if implicit else "", f"{expires_at:.3f}", url, _optional(retention_s),
                self.max_files, _optional(quota.max_files), _optional(quota.max_bytes),
            ],
        )  # fmt: skip
        code = lua.Join(int(joined))
        if code is lua.Join.NO_BATCH:
            raise UploadNotFound(NO_SUCH_BATCH)
        if code is not lua.Join.JOINED:
            error, reason = _JOIN_REFUSALS[code]
            raise error(reason)
        return key, upload_id

    async def get(self, owner: str, name: str) -> Batch:
        """The batch `name` of `owner` (404 for none, or another owner's)."""
        batch = await self.get_any(batch_key_of(owner, name))
        if batch is None or batch.owner != owner:
            raise UploadNotFound(NO_SUCH_BATCH)
        return batch

    async def get_any(self, key: str) -> Batch | None:
        """The batch stored under `key`, whoever owns it (for the sweeper)."""
        batch_key, paths_key = keys_of(key, "batch", "bfiles")
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(batch_key)
            pipe.hgetall(paths_key)
            raw, raw_paths = await pipe.execute()
        return _batch_of(key, raw, raw_paths) if raw else None

    async def seal(self, owner: str, name: str, now: float) -> None:
        """No more paths may join; the batch completes once each path it has is complete."""
        key = batch_key_of(owner, name)
        sealed = await self._seal(
            keys=keys_of(key, *BATCH_KINDS, "events"),
            args=[owner, f"{now:.6f}", current_request_id.get()],
        )
        if lua.Seal(int(sealed)) is lua.Seal.NO_BATCH:
            raise UploadNotFound(NO_SUCH_BATCH)
        await self._made_durable()

    async def remove(
        self,
        key: str,
        reason: Literal["terminated", "expired"],
        *,
        now: float,
        owner: str = "",
        expired_before: float | None = None,
    ) -> list[str] | None:
        """Delete the batch (its `batch.<reason>` event written in the same step): the ids
        of its members, for the caller to remove; None if there was no such batch (of
        `owner`, when given) or, with `expired_before`, it was active again."""
        result: list[Any] = await self._remove(
            keys=keys_of(key, *BATCH_KINDS, "events"),
            args=[
                owner, reason, f"{now:.6f}", _optional(expired_before),
                current_request_id.get() if reason == "terminated" else "",
            ],
        )  # fmt: skip
        if lua.BatchRemove(int(result[0])) is not lua.BatchRemove.REMOVED:
            return None
        await self._made_durable()
        return [as_text(upload_id) for upload_id in result[1]]

    async def due(self, shard: int, now: float, limit: int = 100) -> list[str]:
        """Keys of batches in `shard` whose expiry time has come."""
        rows = await self.redis.zrangebyscore(redis_key(shard, "bexpiry"), "-inf", now, 0, limit)
        return [as_text(cast(bytes, row)) for row in rows]

    async def postpone(self, key: str, until: float) -> None:
        """Look at an open batch again at `until` (its members still upload)."""
        batch_key, expiry_key = keys_of(key, "batch", "bexpiry")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(batch_key, "expires", f"{until:.3f}")
            pipe.zadd(expiry_key, {key: until}, xx=True)
            await pipe.execute()


def _optional(value: float | int | None) -> str:
    if value is None:
        return ""
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _batch_of(key: str, raw: Mapping[Any, Any], raw_paths: Mapping[Any, Any]) -> Batch:
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    paths: dict[str, tuple[str, int | None]] = {}
    for path, value in raw_paths.items():
        upload_id, _, length = as_text(value).partition(" ")
        paths[as_text(path)] = (upload_id, int(length) if length.isdigit() else None)
    return Batch(
        key=key,
        name=fields["name"],
        owner=fields["owner"],
        status=cast(BatchStatus, fields["status"]),
        url=fields.get("url", ""),
        metadata=fields.get("metadata", ""),
        files_expected=_int_or_none(fields.get("files_expected", "")),
        bytes_expected=_int_or_none(fields.get("bytes_expected", "")),
        files=int(fields.get("files") or 0),
        done=int(fields.get("done") or 0),
        done_bytes=int(fields.get("done_bytes") or 0),
        created_at=float(fields["created"]),
        completed_at=float(fields["completed"]) if fields.get("completed") else None,
        expires_at=float(fields["expires"]) if fields.get("expires") else None,
        paths=paths,
    )


def _int_or_none(value: str) -> int | None:
    return int(value) if value else None
