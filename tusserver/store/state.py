"""Upload state in Redis: create, read, commit offsets, complete, terminate, expire, and locks.

Every key carries its shard as a Redis Cluster hash tag, `tus:{<shard>}:...`, and every
atomic step is one Lua script over keys of one shard, so the layout works unchanged on Redis,
Valkey or a Redis Cluster. Offsets move only through `COMMIT`, which checks the lock, the
expected offset and the length; the scripts that change an upload's life append its event to
the shard's stream in the same step.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from tusserver import randomness
from tusserver.errors import (
    BadRequest,
    OffsetMismatch,
    PayloadTooLarge,
    ServiceUnavailable,
    UploadGone,
    UploadNotFound,
)
from tusserver.store import lua
from tusserver.store.aof import Durable, already_durable
from tusserver.store.client import RedisClient, check_layout
from tusserver.store.multiplex import Multiplexed, Step
from tusserver.store.records import (
    SHARD_COUNT,
    Upload,
    UploadStatus,
    as_text,
    flat_pairs,
    is_upload_id,
    keys_of,
    redis_key,
    shard_of,
    upload_from_hash,
    upload_of,
)


class LockLost(Exception):
    """The lock of an upload expired or was taken while its holder still worked."""


class UploadState:
    """All Redis access of tusserver for uploads. One per process, shared by its requests.

    `path_of(upload_id)` names an upload's file inside the data directory, for the events
    (the files layer knows where files lie; this layer never touches them)."""

    def __init__(
        self,
        client: RedisClient,
        *,
        tombstone_ttl_s: float,
        path_of: Callable[[str], str],
        checkpoint_s: float = 0.0,
        renew_client: RedisClient | None = None,
        read_client: RedisClient | None = None,
        steps: Multiplexed | None = None,
        observe: Callable[[str, int], None] = lambda event, committed_bytes: None,
        durable: Durable = already_durable,
    ) -> None:
        # Return once Redis's writes so far are on disk (the embedded Valkey's AOF, synced by
        # this process: store/aof.py); awaited by the steps that promise something to a client.
        self.made_durable = durable
        # `observe(event, committed_bytes)` hears of each event appended (created, completed,
        # terminated, expired) and each byte count committed (event ""), for the metrics.
        self.observe = observe
        # A commit is durable (in the AOF, so it waits for Redis's fsync) when the upload's
        # last durable one is this old, or it completes the upload; 0: every commit is.
        self.checkpoint_s = checkpoint_s
        self.redis = client
        self.tombstone_ttl_ms = int(tombstone_ttl_s * 1000)
        self.path_of = path_of
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        # The steps of one upload run on `steps`, one connection whose commands of one loop
        # turn go out in one write (store/multiplex.py), when Redis is a single server; on a
        # Redis Cluster, on the pooled client, with reads on a pool of their own
        # (`read_client`), so a resuming client's HEAD never waits for a connection behind a
        # burst of creations or PATCH starts (benchmarks/README.md, scenario h).
        host: Multiplexed | RedisClient = steps or client
        reads: Multiplexed | RedisClient = steps or read_client or client
        self._create: Step = host.register_script(lua.CREATE)
        self._commit: Step = host.register_script(lua.COMMIT)
        self._complete: Step = host.register_script(lua.COMPLETE)
        self._remove: Step = host.register_script(lua.REMOVE)
        self._release: Step = host.register_script(lua.RELEASE)
        self._ask_holder: Step = host.register_script(lua.ASK_HOLDER)
        self._declare_length: Step = host.register_script(lua.DECLARE_LENGTH)
        self._acquire: Step = host.register_script(lua.ACQUIRE)
        self._answered: Step = host.register_script(lua.ANSWERED)
        self._read: Step = reads.register_script(lua.READ)
        # The lock renewals have a connection of their own (`renew_client`) and go in one
        # pipeline per tick, so they never queue behind a burst of requests.
        self.renewals = renew_client or client
        self._renew_many: AsyncScript = self.renewals.register_script(lua.RENEW_MANY)

    async def check_layout(self) -> None:
        """`check_layout` on this state's Redis."""
        await check_layout(self.redis)

    # -- reading ---------------------------------------------------------------------------

    async def get(self, upload_id: str, owner: str) -> Upload:
        """The upload, if `owner` owns it. 404 for unknown ids and for other owners; 410 for
        the owner of a terminated or expired upload while its tombstone lasts."""
        upload, _asked = await self.read(upload_id, owner)
        return upload

    async def read(
        self, upload_id: str, owner: str, *, ask: str = "", ttl_ms: int = 0
    ) -> tuple[Upload, bool]:
        """`get`, and in the same step, if the upload is being written by a request holding
        its lock, ask that holder `ask` (a `commit:<nonce>`): the upload and whether it was
        asked. One round trip."""
        result = await self._owned(self._read, upload_id, owner, ask, ttl_ms)
        return upload_of(upload_id, result[1]), int(result[2]) == 1

    async def _owned(self, script: Step, upload_id: str, owner: str, *args: str | int) -> list[Any]:
        """Run ACQUIRE or READ on the upload (their KEYS are the same); their result, after
        404 (no upload of `owner`) or 410 (its tombstone) are raised."""
        if not is_upload_id(upload_id):
            raise UploadNotFound()
        result: list[Any] = await script(
            keys=keys_of(upload_id, "upload", "tomb", "lock", "release", "asked"),
            args=[owner, *args],
        )
        code = lua.Owned(int(result[0]))
        if code is lua.Owned.GONE:
            raise UploadGone(f"this upload was {as_text(result[1])}")
        if code is lua.Owned.NOT_FOUND:
            raise UploadNotFound()
        return result

    async def list_owned(
        self, owner: str, *, after: tuple[float, str] | None, limit: int
    ) -> list[Upload]:
        """Up to `limit` uploads of `owner`, oldest first, after the (created, id) cursor."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(SHARD_COUNT):
                low: str | float = "-inf" if after is None else after[0]
                pipe.zrangebyscore(
                    redis_key(shard, "owner", owner), low, "+inf", start=0, num=limit + 1,
                    withscores=True,
                )  # fmt: skip
            per_shard: list[list[tuple[bytes, float]]] = await pipe.execute()
        candidates = sorted(
            (score, member.decode()) for rows in per_shard for member, score in rows
        )
        if after is not None:
            candidates = [c for c in candidates if c > after]
        ids = [upload_id for _score, upload_id in candidates]
        uploads: list[Upload] = []
        while ids and len(uploads) < limit:  # one round trip, unless an upload vanished
            batch, ids = ids[: limit - len(uploads)], ids[limit - len(uploads) :]
            uploads += [upload for upload in await self.get_many(batch) if upload is not None]
        return uploads

    # -- changing --------------------------------------------------------------------------

    def new_lock_token(self) -> str:
        """A token naming this process, for one lock."""
        return f"{self.holder}:{randomness.token_hex(8)}"

    async def create(self, upload: Upload, *, lock_token: str = "", ttl_ms: int = 0) -> None:
        """Store a new upload, index it, and append its `created` event (and `completed`, for
        an empty upload) in one step; with `lock_token`, lock it for `ttl_ms` in that step."""
        fields = {
            "owner": upload.owner,
            "offset": str(upload.offset),
            "length": "" if upload.length is None else str(upload.length),
            "metadata": upload.metadata,
            "status": upload.status,
            "created": f"{upload.created_at:.6f}",
            "activity": f"{upload.created_at:.6f}",
            "expires": "" if upload.expires_at is None else f"{upload.expires_at:.3f}",
            "url": upload.url,
            "concat": upload.concat,
            "sha256": upload.sha256,
        }
        if upload.created_by:  # the token's digest, for a token that may finish the upload
            fields["creator"] = upload.created_by
        if upload.batch:  # a batch member (joined first: store/batches.py)
            fields |= {"batch": upload.batch, "bpath": upload.batch_path}
        event = upload.as_event("created", upload.created_at, self.path_of(upload.upload_id))
        del event["type"]
        created = await self._create(
            keys=keys_of(
                upload.upload_id, "upload", f"owner:{upload.owner}", "expiry", "events", "lock"
            )
            + upload.batch_keys,
            args=[
                upload.upload_id,
                f"{upload.created_at:.6f}",
                fields["expires"],
                lock_token,
                ttl_ms,
                len(event),
                *flat_pairs(event),
                *flat_pairs(fields),
            ],
        )
        if lua.Create(int(created)) is not lua.Create.CREATED:
            raise RuntimeError("upload id collision")  # 128 random bits: never in practice
        await self.made_durable()
        self.observe("created", upload.offset)
        if upload.status == "completed":
            self.observe("completed", 0)

    async def commit(
        self,
        upload: Upload,
        lock_token: str,
        new_offset: int,
        *,
        now: float,
        expires_at: float | None,
        sha256: str = "",
        ack: str = "",
        release: bool = False,
    ) -> Upload:
        """Move the committed offset from `upload.offset` to `new_offset` while holding the lock.

        Reaching the length marks the upload `received`, or `completed` (with its event) when
        `sha256` is given. Other commits reach Redis's AOF only every `checkpoint_s` per
        upload (docs/architecture.md, "What must reach the disk"). Raises LockLost,
        OffsetMismatch (409), PayloadTooLarge (413)."""
        done = upload.length is not None and new_offset == upload.length
        finished = replace(upload, offset=new_offset, sha256=sha256, status="completed")
        path = self.path_of(upload.upload_id)
        event = finished.as_event("completed", now, path) if done and sha256 else {}
        durable = self.checkpoint_s <= 0 or now - upload.checkpoint_at >= self.checkpoint_s
        result = await self._commit(
            keys=keys_of(upload.upload_id, "upload", "lock", "expiry", "events", "release")
            + upload.batch_keys,
            args=[
                lock_token,
                upload.offset,
                new_offset,
                f"{now:.6f}",
                "" if expires_at is None else f"{expires_at:.3f}",
                sha256,
                ack,
                "1" if release else "",
                "1" if durable else "",
                *flat_pairs(event),
            ],
        )
        code = lua.Commit(int(result[0]))
        if code is lua.Commit.LOCK_NOT_HELD:
            raise LockLost()
        if code is lua.Commit.NO_UPLOAD:
            raise UploadNotFound()
        if code is lua.Commit.OFFSET_MISMATCH:
            raise OffsetMismatch(expected=int(result[1]), got=upload.offset)
        if code is lua.Commit.PAST_LENGTH:
            raise PayloadTooLarge("the body runs past Upload-Length")
        status = cast(UploadStatus, result[2].decode())
        if done:
            await self.made_durable()
        self.observe("completed" if event else "", new_offset - upload.offset)
        return replace(
            upload,
            offset=new_offset,
            status=status,
            expires_at=expires_at,
            sha256=sha256 if status == "completed" else upload.sha256,
            checkpoint_at=now if durable or status != "uploading" else upload.checkpoint_at,
        )

    async def complete(
        self, upload: Upload, sha256: str, *, now: float, expires_at: float | None
    ) -> bool:
        """Mark a `received` upload `completed` with its SHA-256 and append the `completed`
        event, in one step. False if it was not `received` (done already, or removed)."""
        finished = replace(upload, sha256=sha256, status="completed")
        result = await self._complete(
            keys=keys_of(upload.upload_id, "upload", "expiry", "events") + upload.batch_keys,
            args=[
                sha256,
                f"{now:.6f}",
                "" if expires_at is None else f"{expires_at:.3f}",
                *flat_pairs(finished.as_event("completed", now, self.path_of(upload.upload_id))),
            ],
        )
        completed = lua.Complete(int(result)) is lua.Complete.COMPLETED
        if completed:
            await self.made_durable()
            self.observe("completed", 0)
        return completed

    async def declare_length(self, upload: Upload, lock_token: str, length: int) -> Upload:
        """Set the length of a deferred-length upload (400 if it contradicts what is known)."""
        result = lua.DeclareLength(
            await self._declare_length(
                keys=keys_of(upload.upload_id, "upload", "lock"),
                args=[lock_token, length],
            )
        )
        if result is lua.DeclareLength.LOCK_NOT_HELD:
            raise LockLost()
        if result is lua.DeclareLength.NO_UPLOAD:
            raise UploadNotFound()
        if result is lua.DeclareLength.OTHER_LENGTH:
            raise BadRequest("Upload-Length differs from the length already set")
        if result is lua.DeclareLength.BELOW_OFFSET:
            raise BadRequest("Upload-Length is less than the bytes already received")
        await self.made_durable()
        return replace(upload, length=length)

    async def remove(
        self,
        upload: Upload,
        reason: Literal["terminated", "expired"],
        *,
        now: float,
        lock_token: str = "",
        expired_before: float | None = None,
    ) -> bool:
        """Delete the upload's state, leave a tombstone for its owner and append the event.

        Termination passes the lock it holds; expiry passes `expired_before` instead and never
        removes an upload that a request holds or that was active again. True if removed."""
        kinds = ("upload", "lock", f"owner:{upload.owner}", "expiry", "events", "tomb")
        result = await self._remove(
            keys=keys_of(upload.upload_id, *kinds) + upload.batch_keys,
            args=[
                lock_token,
                f"{now:.6f}",
                self.tombstone_ttl_ms,
                reason,
                "" if expired_before is None else f"{expired_before:.3f}",
                *flat_pairs(upload.as_event(reason, now, self.path_of(upload.upload_id))),
            ],
        )
        code = lua.Remove(int(result))
        if code is lua.Remove.LOCK_NOT_HELD:
            raise LockLost()
        if code is lua.Remove.REMOVED:
            await self.made_durable()
            self.observe(reason, 0)
        return code is lua.Remove.REMOVED

    async def due(self, shard: int, now: float, limit: int = 100) -> list[str]:
        """Ids in `shard` whose expiry time has come (to expire, finish or delete)."""
        rows = await self.redis.zrangebyscore(redis_key(shard, "expiry"), "-inf", now, 0, limit)
        return [as_text(cast(bytes, row)) for row in rows]

    async def get_any(self, upload_id: str) -> Upload | None:
        """The upload whoever owns it (for background work), or None."""
        (key,) = keys_of(upload_id, "upload")
        raw = await self.redis.hgetall(key)
        return upload_from_hash(upload_id, raw) if raw else None

    async def get_many(self, upload_ids: list[str]) -> list[Upload | None]:
        """Each upload whoever owns it, or None (one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for upload_id in upload_ids:
                pipe.hgetall(keys_of(upload_id, "upload")[0])
            rows: list[Mapping[bytes, bytes]] = await pipe.execute()
        return [
            upload_from_hash(upload_id, raw) if raw else None
            for upload_id, raw in zip(upload_ids, rows, strict=True)
        ]

    async def unknown(self, upload_ids: list[str]) -> list[str]:
        """Those of `upload_ids` that no upload record names (one round trip)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for upload_id in upload_ids:
                pipe.exists(keys_of(upload_id, "upload")[0])
            found: list[int] = await pipe.execute()
        return [upload_id for upload_id, n in zip(upload_ids, found, strict=True) if not n]

    async def postpone(self, upload_id: str, until: float) -> None:
        (key,) = keys_of(upload_id, "expiry")
        await self.redis.zadd(key, {upload_id: until}, xx=True)

    # -- locks -----------------------------------------------------------------------------

    async def acquire(self, upload_id: str, owner: str, ttl_ms: int) -> tuple[Upload, str] | None:
        """Lock an upload of `owner` and read it, in one step: the upload and the lock's
        token, or None while another request holds it. 404/410 as `get`."""
        token = self.new_lock_token()
        result = await self._owned(self._acquire, upload_id, owner, token, ttl_ms)
        if lua.Owned(int(result[0])) is lua.Owned.LOCKED:
            return None
        return upload_of(upload_id, result[1]), token

    async def try_lock(self, upload_id: str, ttl_ms: int) -> str | None:
        """Take the upload's lock if it is free; the token to renew and release it, or None."""
        token = self.new_lock_token()
        (key,) = keys_of(upload_id, "lock")
        taken = await self.redis.set(key, token, nx=True, px=ttl_ms)
        return token if taken else None

    async def ask_holder(self, upload_id: str, request: str, ttl_ms: int) -> bool:
        """Ask the lock's holder to `stop` or to `commit:<nonce>`; False if nobody holds it."""
        asked = await self._ask_holder(
            keys=keys_of(upload_id, "lock", "release", "asked"),
            args=[request, ttl_ms],
        )
        return lua.AskHolder(int(asked)) is lua.AskHolder.ASKED

    async def holder_answered(self, upload_id: str, nonce: str) -> bool:
        """True once the holder committed for the request `commit:<nonce>`, or let go."""
        answered = await self._answered(
            keys=keys_of(upload_id, "upload", "lock"),
            args=[nonce],
        )
        return lua.Answered(int(answered)) is lua.Answered.ANSWERED

    async def renew(
        self, upload_id: str, token: str, ttl_ms: int, *, extend_below_ms: int | None = None
    ) -> str:
        """Keep our lock: when less than `extend_below_ms` of it is left (default: always)
        it is extended back to `ttl_ms`, so it has at least that much left after a renewal;
        the pending request to us ("stop", "commit:<n>" or ""). Raises LockLost if the lock
        is not ours any more."""
        extend_below_ms = ttl_ms + 1 if extend_below_ms is None else extend_below_ms
        [renewal] = await self.renew_many(
            [(upload_id, token)], ttl_ms, extend_below_ms=extend_below_ms
        )
        if isinstance(renewal, LockLost):
            raise renewal
        return renewal

    async def renew_many(
        self, locks: list[tuple[str, str]], ttl_ms: int, *, extend_below_ms: int
    ) -> list[str | LockLost]:
        """`renew` for many (upload id, token) locks: one script call per shard (its keys
        share the shard's slot), all of them in one round trip (a pipeline; on a cluster,
        whose pipelines may not carry scripts, concurrently): for each lock, in order, its
        pending request, or LockLost. Raises the Redis error if the round trip fails."""
        by_shard: dict[int, list[int]] = {}
        for index, (upload_id, _token) in enumerate(locks):
            by_shard.setdefault(shard_of(upload_id), []).append(index)
        calls: list[tuple[list[str], list[str | int]]] = []
        for indexes in by_shard.values():
            keys = [key for i in indexes for key in keys_of(locks[i][0], "lock", "release")]
            calls.append((keys, [ttl_ms, extend_below_ms, *(locks[i][1] for i in indexes)]))
        client = self.renewals
        if not isinstance(client, aioredis.Redis):
            replies = await asyncio.gather(
                *(self._renew_many(keys=keys, args=args) for keys, args in calls)
            )
        else:
            async with client.pipeline(transaction=False) as pipe:
                for keys, args in calls:
                    await self._renew_many(keys=keys, args=args, client=pipe)
                replies = await pipe.execute()
        answers: list[str | LockLost] = [LockLost()] * len(locks)
        for indexes, reply in zip(by_shard.values(), replies, strict=True):
            for index, result in zip(indexes, reply, strict=True):
                answers[index] = _renewal(result)
        return answers

    async def ask_counts(self, shards: list[int]) -> list[bytes | None]:
        """The ask counter of each shard (ASK_HOLDER): when it has not moved since a
        renewal, no holder in that shard was asked anything meanwhile."""
        keys = [redis_key(shard, "asked") for shard in shards]
        client = self.renewals
        if isinstance(client, aioredis.Redis):
            return cast(list[bytes | None], await client.mget(keys))
        return cast(list[bytes | None], await client.mget_nonatomic(keys))  # across slots

    async def release(self, upload_id: str, token: str) -> None:
        await self._release(
            keys=keys_of(upload_id, "lock", "release"),
            args=[token],
        )

    async def ping(self) -> None:
        try:
            await self.redis.ping()
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as error:
            raise ServiceUnavailable("the state store (Redis) is unreachable") from error


def _renewal(result: object) -> str | LockLost:
    """One lock's answer from RENEW_MANY: the pending request ("" for none), or LockLost."""
    if result == lua.Renew.LOCK_NOT_HELD:
        return LockLost()
    return result.decode() if isinstance(result, bytes) else str(result)
