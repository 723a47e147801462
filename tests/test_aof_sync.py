"""The embedded Valkey's AOF, synced by tusserver (store/aof.py): the steps waiting at once
share one round, a step that arrives during a round waits for the next, a Valkey that could
not write its AOF or a failed fdatasync fails the steps (503) instead of answering them, and a
rewrite's new incremental file is followed.

A real Valkey with `appendfsync no` (as `tusserver` starts it under --fsync always), real
files; the sync thread can be held back before a round's fdatasyncs begin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support.faultfs import seen_by, server_on_small_disk, small_tmpfs_unavailable
from tests.support.tools import require_tool
from tests.support.tus import TUS
from tusserver.errors import ServiceUnavailable
from tusserver.store.aof import AofSync
from tusserver.store.embedded import EmbeddedRedis

WAIT_S = 30.0


@pytest.fixture
async def client(own_redis: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    redis = aioredis.Redis.from_url(own_redis.url)
    await redis.config_set("appendfsync", "no")  # as tusserver starts it
    try:
        yield redis
    finally:
        await redis.aclose()


@pytest.fixture
async def aof(own_redis: EmbeddedRedis, client: aioredis.Redis) -> AsyncIterator[AofSync]:
    synced = AofSync(own_redis.aof_dir, client)
    try:
        yield synced
    finally:
        await synced.close()


class HeldRounds:
    """Holds each round before its file syncs: `reached` gets a permit when a round arrives
    there, and the round goes on once the test gives `go` one."""

    def __init__(self, aof: AofSync) -> None:
        self.reached, self.go = threading.Semaphore(0), threading.Semaphore(0)
        sync_files = aof._sync_files

        def held() -> None:
            self.reached.release()
            assert self.go.acquire(timeout=WAIT_S), "the test never let the round go on"
            sync_files()

        aof._sync_files = held  # type: ignore[method-assign]

    async def until_reached(self) -> None:
        assert await asyncio.to_thread(self.reached.acquire, True, WAIT_S), "no round came"


async def test_the_steps_waiting_at_once_share_one_round(
    aof: AofSync, client: aioredis.Redis
) -> None:
    await client.set("before", "1")
    await asyncio.wait_for(asyncio.gather(*(aof.durable() for _ in range(50))), WAIT_S)
    assert aof.rounds == 1


async def test_a_step_arriving_during_a_round_waits_for_the_next(
    aof: AofSync, client: aioredis.Redis
) -> None:
    rounds = HeldRounds(aof)
    first = asyncio.create_task(aof.durable())
    await rounds.until_reached()
    # this write may have been after the round's INFO: the round under way cannot cover it
    await client.set("during", "1")
    second = asyncio.create_task(aof.durable())
    rounds.go.release()
    await asyncio.wait_for(first, WAIT_S)
    await rounds.until_reached()  # a second round, held before its syncs
    assert not second.done() and aof.rounds == 1
    rounds.go.release()
    await asyncio.wait_for(second, WAIT_S)
    assert aof.rounds == 2


async def test_a_failed_fdatasync_fails_this_step_and_every_later_one(
    tmp_path: Path, client: aioredis.Redis
) -> None:
    # an "AOF file" that fdatasync refuses (EINVAL): a real failure of the system call
    (tmp_path / "appendonly.aof.1.incr.aof").symlink_to("/dev/null")
    aof = AofSync(tmp_path, client)
    try:
        with pytest.raises(ServiceUnavailable, match="could not be synced"):
            await asyncio.wait_for(aof.durable(), WAIT_S)
        (tmp_path / "appendonly.aof.1.incr.aof").unlink()
        with pytest.raises(ServiceUnavailable, match="restart"):
            await asyncio.wait_for(aof.durable(), WAIT_S)  # the lost pages stay lost
        assert "could not be synced" in aof.failure
    finally:
        await aof.close()


async def test_a_rewrite_s_new_incremental_file_is_synced_and_the_old_one_let_go(
    aof: AofSync, client: aioredis.Redis, own_redis: EmbeddedRedis
) -> None:
    await client.set("first", "1")
    await aof.durable()
    before = set(aof._files)
    assert before and all(".incr.aof" in name for name in before)
    await client.bgrewriteaof()
    for _ in range(int(WAIT_S * 10)):  # until the rewrite has ended
        info = await client.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            break
        await asyncio.sleep(0.1)
    await client.set("second", "1")
    await aof.durable()
    now = {name for name in os.listdir(own_redis.aof_dir) if ".incr.aof" in name}
    assert set(aof._files) == now and now != before
    written = b"".join((own_redis.aof_dir / name).read_bytes() for name in now)
    assert b"second" in written


def fill_up(path: Path) -> None:
    """Write zeros to `path` until the disk is full."""
    with open(path, "wb", buffering=0) as fill:
        with contextlib.suppress(OSError):  # ENOSPC
            while fill.write(b"\0" * 4096):
                pass


@pytest.fixture
def small_disk_ok() -> None:
    reason = small_tmpfs_unavailable()
    require_tool(reason is None, reason or "")


@pytest.mark.usefixtures("small_disk_ok")
async def test_a_creation_valkey_could_not_write_to_its_aof_is_not_answered_201(
    tmp_path: Path,
) -> None:
    """With the data directory (and so the embedded Valkey's AOF) on a full disk, Valkey
    still answers the creation's step, but its AOF write failed: the client gets 503, never a
    201 for an upload that a crash would lose. Once there is room, creations succeed."""
    data_dir = tmp_path / "small"
    with server_on_small_disk(data_dir, "4m") as server:
        aof_dir = seen_by(server, data_dir / "redis" / "appendonlydir")
        filler = seen_by(server, data_dir / "filler")
        await asyncio.to_thread(fill_up, filler)
        answered: dict[str, int] = {}
        async with aiohttp.ClientSession() as http:
            for _ in range(40):  # the AOF's last page may hold a few records still
                headers = {**TUS, "Upload-Length": "10", "Upload-Metadata": "filename eA=="}
                async with http.post(server.url, headers=headers) as response:
                    location = response.headers.get("Location", "")
                    answered[location] = response.status
                    if response.status != 201:
                        break
            assert 503 in answered.values(), answered
            # Valkey now refuses writes (MISCONF) until its AOF write succeeds: 503 too
            async with http.post(server.url, headers={**TUS, "Upload-Length": "1"}) as refused:
                assert refused.status == 503, await refused.text()
                assert "retry later" in await refused.text()
            in_aof = b"".join(path.read_bytes() for path in aof_dir.glob("*.incr.aof"))
            for location, status in answered.items():
                if status == 201:  # each 201 names an upload whose record is in the file
                    assert location.rsplit("/", 1)[1].encode() in in_aof
            filler.unlink()
            for _ in range(int(WAIT_S * 10)):  # Valkey writes again at its next turn
                async with http.post(server.url, headers={**TUS, "Upload-Length": "1"}) as again:
                    if again.status == 201:
                        break
                await asyncio.sleep(0.1)
            assert again.status == 201
