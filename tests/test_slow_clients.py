"""Many slow clients at once, as phones on bad networks are: one server process keeps every
upload going. Their lock renewals share one Redis round trip per tick, their steps one
connection whose commands of one loop turn go out together, and the rest a bounded pool that
waits for a free connection instead of failing (before, a few hundred open uploads ran the
Redis pool dry and got 503 "Too many connections")."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support.processes import ServerProcess
from tests.support.servers import Server
from tests.support.tus import create_upload, head_offset, patch_headers
from tests.support.waiting import wait_until
from tusserver.store.client import MAX_CONNECTIONS, RENEWAL_CONNECTIONS
from tusserver.uploads.service import CREATIONS_AT_ONCE

UPLOADS = 400
PIECES = 4  # bytes each upload sends, one at a time
PAUSE_S = 0.4  # between two bytes: a body that lasts over a second, so locks are renewed


async def slow_body(first: int) -> AsyncIterator[bytes]:
    """PIECES bytes, one at a time, with a pause before each but the first (pacing a slow
    client, not waiting for the server)."""
    for index in range(PIECES):
        if index:
            await asyncio.sleep(PAUSE_S)
        yield bytes([first + index])


@pytest.mark.slow
async def test_hundreds_of_slow_uploads_at_once_all_complete(
    processes: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = processes(tmp_path / "data", "--fsync", "never")
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        urls = await asyncio.gather(
            *(create_upload(http, server.url, PIECES) for _ in range(UPLOADS))
        )

        async def send(index: int, url: str) -> int:
            body = slow_body(index % 200)
            async with http.patch(url, data=body, headers=patch_headers(0)) as response:
                return response.status

        statuses = await asyncio.gather(*(send(i, url) for i, url in enumerate(urls)))
        assert statuses == [204] * UPLOADS
        offsets = await asyncio.gather(*(head_offset(http, url) for url in urls))
        assert offsets == [PIECES] * UPLOADS
    valkey = aioredis.Redis.from_url(f"unix://{server.data_dir / 'redis' / 'valkey.sock'}")
    try:
        clients = await valkey.info("clients")
    finally:
        await valkey.aclose()
    # the server's pools (shared, renewals), the upload steps' one connection, the sweeper's
    # and event reader's own, and this one
    pools = MAX_CONNECTIONS + RENEWAL_CONNECTIONS + 1
    assert clients["connected_clients"] <= pools + 3


async def test_uploads_answer_while_every_pooled_redis_connection_is_busy(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """The steps of uploads (creation, HEAD, PATCH) share one connection of their own and
    never wait for a pooled one: a burst that holds every pooled connection does not hold
    them (before, a HEAD queued behind creations and PATCH starts for up to 3 s while 2,000
    phones were being created)."""
    url = await create_upload(http, server.url, 10)
    shared = server.uploads.state.redis
    assert isinstance(shared, aioredis.Redis)
    pool = shared.connection_pool
    assert isinstance(pool, aioredis.BlockingConnectionPool)
    held = [
        await pool.get_connection()  # type: ignore[no-untyped-call]
        for _ in range(pool.max_connections)
    ]
    try:
        async with asyncio.timeout(5):  # the pool would wait 10 s, then answer 503
            assert await head_offset(http, url) == 0
            other = await create_upload(http, server.url, 3)
            async with http.patch(other, data=b"abc", headers=patch_headers(0)) as response:
                assert response.status == 204
        listing = asyncio.ensure_future(http.get(server.url))
        done, _pending = await asyncio.wait([listing], timeout=0.3)
        assert not done  # the pool really was exhausted: a listing (pooled) waits for it
    finally:
        for connection in held:
            await pool.release(connection)
    async with await listing as response:
        assert response.status == 200


async def test_creations_beyond_the_bound_wait_their_turn_while_uploads_go_on(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """A process creates at most CREATIONS_AT_ONCE uploads at once; more wait in order, and
    the requests of uploads under way (HEAD, PATCH) never wait with them."""
    url = await create_upload(http, server.url, 3)
    creating = server.uploads.creating
    for _ in range(CREATIONS_AT_ONCE):  # as if that many creations were in progress
        await creating.acquire()
    try:
        creation = asyncio.ensure_future(create_upload(http, server.url, 3))
        async with asyncio.timeout(5):
            assert await head_offset(http, url) == 0
            async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
                assert response.status == 204
        done, _pending = await asyncio.wait([creation], timeout=0.3)
        assert not done  # it waits for its turn
    finally:
        for _ in range(CREATIONS_AT_ONCE):
            creating.release()
    assert (await creation).startswith(server.url)


async def test_a_creation_with_upload_holds_no_turn_while_its_body_arrives(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """Only making the file and the record takes a turn: more creations with upload than the
    bound whose bodies are still on their way leave room for new creations."""
    arrived = asyncio.Event()

    async def held_body() -> AsyncIterator[bytes]:
        yield b"a"
        await arrived.wait()
        yield b"b"

    async def create_with_upload() -> int:
        headers = {**patch_headers(0), "Upload-Length": "2"}
        del headers["Upload-Offset"]
        async with http.post(server.url, data=held_body(), headers=headers) as response:
            return response.status

    async def all_created() -> bool:
        records = [key async for key in redis.scan_iter(match="tus:*:upload:*")]
        return len(records) == CREATIONS_AT_ONCE + 8

    redis = server.uploads.state.redis
    bodies = [asyncio.ensure_future(create_with_upload()) for _ in range(CREATIONS_AT_ONCE + 8)]
    try:
        await wait_until(all_created, what="every creation, its body still arriving")
        async with asyncio.timeout(5):
            assert (await create_upload(http, server.url, 3)).startswith(server.url)
    finally:
        arrived.set()
    assert await asyncio.gather(*bodies) == [201] * (CREATIONS_AT_ONCE + 8)


async def test_redis_replies_are_parsed_in_c(server: Server) -> None:
    """redis-py parses replies with hiredis (a dependency) when it is installed; without it,
    every Redis step of every request costs more CPU (the pure-Python parser)."""
    shared = server.uploads.state.redis
    assert isinstance(shared, aioredis.Redis)
    connection = await shared.connection_pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        assert type(connection._parser).__name__ == "_AsyncHiredisParser"
    finally:
        await shared.connection_pool.release(connection)
