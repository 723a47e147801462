"""The Redis state layer on its own: every Lua step against a real Redis (the embedded Valkey,
or the stock Redis that .ci/run passes in TUS_TEST_REDIS_URL)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis

from tusserver.errors import OffsetMismatch, PayloadTooLarge, UploadGone, UploadNotFound
from tusserver.store.embedded import EmbeddedRedis
from tusserver.store.multiplex import Multiplexed
from tusserver.store.records import SHARD_COUNT, Upload, new_upload_id, redis_key
from tusserver.store.state import LockLost, UploadState

LOCK_MS = 3000


@pytest.fixture(params=["multiplexed", "pooled"])
async def state(flushed_redis: str, request: pytest.FixtureRequest) -> AsyncIterator[UploadState]:
    """The steps on one shared connection (a single Redis), or on the pooled client (as on a
    Redis Cluster)."""
    client = aioredis.Redis.from_url(flushed_redis)
    steps = None
    if request.param == "multiplexed":
        steps = Multiplexed(client.connection_pool, timeout_s=10)
    yield UploadState(
        client, tombstone_ttl_s=60, path_of=lambda upload_id: f"uploads/{upload_id}", steps=steps
    )
    if steps is not None:
        await steps.aclose()
    await client.aclose()


def new_upload(length: int | None = 10, owner: str = "alice") -> Upload:
    now = time.time()
    return Upload(
        upload_id=new_upload_id(),
        owner=owner,
        offset=0,
        length=length,
        metadata="filename bmFtZQ==",
        status="uploading",
        created_at=now,
        expires_at=now + 60,
        url="http://example/files/x",
    )


async def events_of(state: UploadState, upload: Upload) -> list[str]:
    key = redis_key(upload.shard, "events")
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], await state.redis.xrange(key))
    return [
        fields[b"type"].decode()
        for _id, fields in entries
        if fields[b"upload_id"].decode() == upload.upload_id
    ]


async def test_create_then_get_returns_the_same_upload(state: UploadState) -> None:
    upload = new_upload()
    await state.create(upload)
    stored = await state.get(upload.upload_id, "alice")
    assert (stored.length, stored.offset, stored.metadata, stored.owner) == (
        10,
        0,
        upload.metadata,
        "alice",
    )
    assert await events_of(state, upload) == ["created"]


async def test_create_can_take_the_lock_in_the_same_step(state: UploadState) -> None:
    upload = new_upload()
    token = state.new_lock_token()
    await state.create(upload, lock_token=token, ttl_ms=LOCK_MS)
    assert await state.try_lock(upload.upload_id, LOCK_MS) is None  # held from the start
    assert await state.acquire(upload.upload_id, "alice", LOCK_MS) is None
    committed = await state.commit(upload, token, 3, now=time.time(), expires_at=None)
    assert committed.offset == 3
    await state.release(upload.upload_id, token)
    assert await state.try_lock(upload.upload_id, LOCK_MS) is not None
    unlocked = new_upload()
    await state.create(unlocked)  # without a token: free to lock
    assert await state.try_lock(unlocked.upload_id, LOCK_MS) is not None


async def test_other_owner_and_unknown_ids_are_not_found(state: UploadState) -> None:
    upload = new_upload()
    await state.create(upload)
    with pytest.raises(UploadNotFound):
        await state.get(upload.upload_id, "mallory")
    with pytest.raises(UploadNotFound):
        await state.get("../../etc/passwd", "alice")
    with pytest.raises(UploadNotFound):
        await state.get(new_upload_id(), "alice")


async def test_commit_checks_lock_and_expected_offset(state: UploadState) -> None:
    upload = new_upload()
    await state.create(upload)
    token = await state.try_lock(upload.upload_id, LOCK_MS)
    assert token is not None
    assert await state.try_lock(upload.upload_id, LOCK_MS) is None
    with pytest.raises(LockLost):
        await state.commit(upload, "not-the-token", 4, now=time.time(), expires_at=None)
    moved = await state.commit(upload, token, 4, now=time.time(), expires_at=None)
    assert moved.offset == 4
    with pytest.raises(OffsetMismatch) as mismatch:
        await state.commit(upload, token, 6, now=time.time(), expires_at=None)  # stale: expects 0
    assert mismatch.value.headers["Upload-Offset"] == "4"
    with pytest.raises(PayloadTooLarge):
        await state.commit(moved, token, 11, now=time.time(), expires_at=None)
    assert (await state.get(upload.upload_id, "alice")).offset == 4


async def test_reaching_the_length_with_a_hash_completes_with_one_event(state: UploadState) -> None:
    upload = new_upload(length=3)
    await state.create(upload)
    token = await state.try_lock(upload.upload_id, LOCK_MS)
    assert token is not None
    done = await state.commit(upload, token, 3, now=time.time(), expires_at=None, sha256="ab" * 32)
    assert done.status == "completed"
    assert (await state.get(upload.upload_id, "alice")).sha256 == "ab" * 32
    assert await events_of(state, upload) == ["created", "completed"]


async def test_received_upload_completes_once(state: UploadState) -> None:
    upload = new_upload(length=3)
    await state.create(upload)
    token = await state.try_lock(upload.upload_id, LOCK_MS)
    assert token is not None
    received = await state.commit(upload, token, 3, now=time.time(), expires_at=time.time() + 60)
    assert received.status == "received"
    assert await events_of(state, upload) == ["created"]
    assert await state.complete(received, "cd" * 32, now=time.time(), expires_at=None)
    assert not await state.complete(received, "cd" * 32, now=time.time(), expires_at=None)
    assert await events_of(state, upload) == ["created", "completed"]


async def test_terminate_leaves_a_tombstone_for_the_owner_only(state: UploadState) -> None:
    upload = new_upload()
    await state.create(upload)
    token = await state.try_lock(upload.upload_id, LOCK_MS)
    assert token is not None
    removed = await state.remove(upload, "terminated", now=time.time(), lock_token=token)
    assert removed
    with pytest.raises(UploadGone):
        await state.get(upload.upload_id, "alice")
    with pytest.raises(UploadNotFound):
        await state.get(upload.upload_id, "mallory")
    assert await events_of(state, upload) == ["created", "terminated"]


async def test_expiry_skips_held_and_fresh_uploads(state: UploadState) -> None:
    upload = new_upload()
    await state.create(upload)
    assert upload.expires_at is not None
    early = upload.expires_at - 1
    assert not await state.remove(upload, "expired", now=early, expired_before=early)
    token = await state.try_lock(upload.upload_id, LOCK_MS)
    assert token is not None
    late = upload.expires_at + 1
    assert not await state.remove(upload, "expired", now=late, expired_before=late)
    await state.release(upload.upload_id, token)
    assert await state.due(upload.shard, late) == [upload.upload_id]
    assert await state.remove(upload, "expired", now=late, expired_before=late)
    assert await events_of(state, upload) == ["created", "expired"]


async def test_holder_hears_stop_and_commit_requests(state: UploadState) -> None:
    upload = new_upload()
    await state.create(upload)
    assert not await state.ask_holder(upload.upload_id, "stop", LOCK_MS)  # nobody holds it
    token = await state.try_lock(upload.upload_id, LOCK_MS)
    assert token is not None
    assert await state.renew(upload.upload_id, token, LOCK_MS) == ""
    assert await state.ask_holder(upload.upload_id, "commit:n1", LOCK_MS)
    assert await state.renew(upload.upload_id, token, LOCK_MS) == "commit:n1"
    assert not await state.holder_answered(upload.upload_id, "n1")
    await state.commit(upload, token, 0, now=time.time(), expires_at=None, ack="n1")
    assert await state.holder_answered(upload.upload_id, "n1")
    assert await state.renew(upload.upload_id, token, LOCK_MS) == ""
    assert await state.ask_holder(upload.upload_id, "stop", LOCK_MS)
    assert await state.ask_holder(upload.upload_id, "commit:n2", LOCK_MS)  # held: asked
    assert await state.renew(upload.upload_id, token, LOCK_MS) == "stop"  # stop wins
    await state.release(upload.upload_id, token)
    assert await state.holder_answered(upload.upload_id, "never-acknowledged")  # let go
    with pytest.raises(LockLost):
        await state.renew(upload.upload_id, token, LOCK_MS)


async def test_read_asks_a_writing_holder_to_commit_in_the_same_step(
    state: UploadState,
) -> None:
    upload = new_upload()
    await state.create(upload)
    read, asked = await state.read(upload.upload_id, "alice", ask="commit:n1", ttl_ms=LOCK_MS)
    assert (read.offset, asked) == (0, False)  # nobody holds it: nothing to ask
    token = await state.try_lock(upload.upload_id, LOCK_MS)
    assert token is not None
    _read, asked = await state.read(upload.upload_id, "alice")  # no request: just a read
    assert not asked and await state.renew(upload.upload_id, token, LOCK_MS) == ""
    _read, asked = await state.read(upload.upload_id, "alice", ask="commit:n2", ttl_ms=LOCK_MS)
    assert asked and await state.renew(upload.upload_id, token, LOCK_MS) == "commit:n2"
    assert await state.ask_holder(upload.upload_id, "stop", LOCK_MS)
    _read, asked = await state.read(upload.upload_id, "alice", ask="commit:n3", ttl_ms=LOCK_MS)
    assert asked and await state.renew(upload.upload_id, token, LOCK_MS) == "stop"  # kept
    with pytest.raises(UploadNotFound):
        await state.read(upload.upload_id, "mallory", ask="commit:n4", ttl_ms=LOCK_MS)
    assert await state.renew(upload.upload_id, token, LOCK_MS) == "stop"  # mallory asked nobody
    done = await state.commit(upload, token, 10, now=time.time(), expires_at=None, sha256="0" * 64)
    assert done.status == "completed"
    _read, asked = await state.read(upload.upload_id, "alice", ask="commit:n5", ttl_ms=LOCK_MS)
    assert not asked  # held, but complete: nothing to commit


async def test_deferred_length_is_declared_once(state: UploadState) -> None:
    upload = new_upload(length=None)
    await state.create(upload)
    token = await state.try_lock(upload.upload_id, LOCK_MS)
    assert token is not None
    declared = await state.declare_length(upload, token, 5)
    assert declared.length == 5
    assert (await state.declare_length(upload, token, 5)).length == 5
    with pytest.raises(Exception, match="differs"):
        await state.declare_length(upload, token, 6)


async def test_list_owned_pages_through_every_shard(state: UploadState) -> None:
    created = []
    for _ in range(7):
        upload = new_upload(owner="lister")
        await state.create(upload)
        created.append(upload.upload_id)
    await state.create(new_upload(owner="someone-else"))
    seen: list[str] = []
    cursor = None
    while True:
        page = await state.list_owned("lister", after=cursor, limit=3)
        if not page:
            break
        seen += [u.upload_id for u in page]
        cursor = (page[-1].created_at, page[-1].upload_id)
    assert sorted(seen) == sorted(created)
    assert len(seen) == len(set(seen))


async def test_renew_extends_the_lock_only_once_it_has_run_down(state: UploadState) -> None:
    upload = new_upload()
    await state.create(upload)
    token = await state.try_lock(upload.upload_id, LOCK_MS)
    assert token is not None
    lock_key = redis_key(upload.shard, "lock", upload.upload_id)
    await state.redis.pexpire(lock_key, 2000)
    assert await state.renew(upload.upload_id, token, LOCK_MS, extend_below_ms=1500) == ""
    assert await state.redis.pttl(lock_key) <= 2000  # enough left: only read, not written
    assert await state.renew(upload.upload_id, token, LOCK_MS, extend_below_ms=2500) == ""
    assert await state.redis.pttl(lock_key) > 2000  # ran down past the threshold: extended
    await state.redis.pexpire(lock_key, 2000)
    assert await state.renew(upload.upload_id, token, LOCK_MS) == ""
    assert await state.redis.pttl(lock_key) > 2000  # by default, every renewal extends it


async def test_renew_many_answers_each_lock_in_one_round_trip(state: UploadState) -> None:
    held, taken = new_upload(), new_upload()
    for upload in (held, taken):
        await state.create(upload)
    acquired = await state.acquire(held.upload_id, "alice", LOCK_MS)
    other = await state.acquire(taken.upload_id, "alice", LOCK_MS)
    assert acquired is not None and other is not None
    await state.ask_holder(held.upload_id, "stop", LOCK_MS)
    answers = await state.renew_many(
        [(held.upload_id, acquired[1]), (taken.upload_id, "not-the-token")],
        LOCK_MS,
        extend_below_ms=LOCK_MS + 1,
    )
    assert answers[0] == "stop"
    assert isinstance(answers[1], LockLost)


async def test_lock_traffic_never_reaches_the_append_only_file(tmp_path: Path) -> None:
    """Locks and requests to their holders are volatile: under `appendfsync always` a write of
    theirs would cost an fsync on Valkey's only thread (every reply of that turn waits for
    the disk), so the scripts keep them out of the AOF, while the upload itself is in it."""
    embedded = EmbeddedRedis(tmp_path, appendfsync="always")
    client = aioredis.Redis.from_url(embedded.start())
    try:
        state = UploadState(client, tombstone_ttl_s=60, path_of=lambda upload_id: upload_id)
        upload = new_upload()
        token = state.new_lock_token()
        await state.create(upload, lock_token=token, ttl_ms=LOCK_MS)
        await state.renew(upload.upload_id, token, LOCK_MS)  # extends: a write
        await state.ask_holder(upload.upload_id, f"commit:{new_upload_id()}", LOCK_MS)
        await state.read(upload.upload_id, "alice", ask="commit:x", ttl_ms=LOCK_MS)
        upload = await state.commit(upload, token, 0, now=time.time(), expires_at=None)
        await state.release(upload.upload_id, token)
        again = await state.acquire(upload.upload_id, "alice", LOCK_MS)
        assert again is not None
        await state.commit(upload, again[1], 5, now=time.time(), expires_at=None, release=True)
        assert not await client.exists(redis_key(upload.shard, "lock", upload.upload_id))
        # (read while Valkey runs: a planned stop writes the whole dataset into the AOF)
        logged = b"".join(path.read_bytes() for path in (tmp_path / "redis").rglob("*.aof"))
    finally:
        await client.aclose()
        embedded.stop()
    assert f"upload:{upload.upload_id}".encode() in logged  # the AOF is the one we read
    assert b":lock:" not in logged
    assert b":release:" not in logged


async def test_renew_many_keeps_each_answer_with_its_lock_across_shards(
    state: UploadState,
) -> None:
    """Many locks spread over every shard, renewed one script call per shard: each answer
    (its pending request, or LockLost) comes back in the order the locks were given, and
    a lock that has run down is extended."""
    uploads = [replace(new_upload(), upload_id=new_upload_id(n % SHARD_COUNT)) for n in range(64)]
    tokens = []
    for number, upload in enumerate(uploads):
        await state.create(upload)
        acquired = await state.acquire(upload.upload_id, "alice", LOCK_MS)
        assert acquired is not None
        tokens.append(acquired[1] if number % 7 else "not-the-token")
        if number % 5 == 0:
            await state.ask_holder(upload.upload_id, f"commit:{number}", LOCK_MS)
    assert len({upload.shard for upload in uploads}) == SHARD_COUNT
    low = redis_key(uploads[1].shard, "lock", uploads[1].upload_id)
    await state.redis.pexpire(low, 1000)
    answers = await state.renew_many(
        [(u.upload_id, t) for u, t in zip(uploads, tokens, strict=True)],
        LOCK_MS,
        extend_below_ms=1500,
    )
    for number, answer in enumerate(answers):
        if number % 7 == 0:
            assert isinstance(answer, LockLost), number
        else:
            assert answer == (f"commit:{number}" if number % 5 == 0 else ""), number
    assert await state.redis.pttl(low) > 1500
