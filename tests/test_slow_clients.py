"""Many slow clients at once, as phones on bad networks are: one server process keeps every
upload going. Their lock renewals share one Redis round trip per tick and a bounded pool of
connections that waits for a free connection instead of failing (before, a few hundred open
uploads ran the Redis pool dry and got 503 "Too many connections")."""

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
from tusserver.store.client import MAX_CONNECTIONS
from tusserver.uploads.service import READ_CONNECTIONS, RENEWAL_CONNECTIONS

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
    # the server's pools (shared, reads, renewals), the sweeper's and event reader's own,
    # and this one
    pools = MAX_CONNECTIONS + READ_CONNECTIONS + RENEWAL_CONNECTIONS
    assert clients["connected_clients"] <= pools + 3


async def test_head_answers_while_every_shared_redis_connection_is_busy(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """A resuming client's HEAD reads on connections of its own: a burst that holds every
    connection of the shared pool (creations, PATCH starts) does not make it wait for one
    (before, it queued behind them: up to 3 s while 2,000 phones were being created)."""
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
        async with asyncio.timeout(5):  # the shared pool would wait 10 s, then answer 503
            assert await head_offset(http, url) == 0
        creation = asyncio.ensure_future(create_upload(http, server.url, 10))
        done, _pending = await asyncio.wait([creation], timeout=0.3)
        assert not done  # the shared pool really was exhausted: a creation waits for it
    finally:
        for connection in held:
            await pool.release(connection)
    assert (await creation).startswith(server.url)


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
