"""The shared Redis connection of the upload steps (store/multiplex.py), against a real
Redis: replies reach their own callers, the steps of one loop turn go out together, and a
lost, killed or silent connection fails only the steps that were waiting on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

from tusserver.store.embedded import EmbeddedRedis
from tusserver.store.multiplex import Multiplexed

NAME = "tus-multiplex-test"


@pytest.fixture
async def admin(flushed_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(flushed_redis)
    yield client
    await client.aclose()


@pytest.fixture
async def steps(admin: aioredis.Redis) -> AsyncIterator[Multiplexed]:
    multiplexed = Multiplexed(admin.connection_pool, timeout_s=10)
    await multiplexed.execute("CLIENT", "SETNAME", NAME)
    yield multiplexed
    await multiplexed.aclose()


async def named_connections(admin: aioredis.Redis) -> list[dict[str, str]]:
    return [c for c in await admin.client_list() if c.get("name") == NAME]


async def test_every_caller_gets_its_own_reply_and_errors_stay_with_theirs(
    steps: Multiplexed, admin: aioredis.Redis
) -> None:
    await admin.set("text", "not a number")
    calls = [
        steps.execute("INCRBY", f"counter:{i % 7}", i) if i % 50 else steps.execute("INCR", "text")
        for i in range(1000)
    ]
    replies = await asyncio.gather(*calls, return_exceptions=True)
    totals = [0] * 7
    for i, reply in enumerate(replies):
        if i % 50 == 0:
            assert isinstance(reply, ResponseError)
            continue
        totals[i % 7] += i
        assert reply == totals[i % 7]  # each INCRBY's own running total, in order
    assert [int(await admin.get(f"counter:{k}") or 0) for k in range(7)] == totals
    assert len(await named_connections(admin)) == 1  # one connection carried all of them


async def test_the_steps_of_one_loop_turn_reach_redis_in_a_few_reads(
    steps: Multiplexed, admin: aioredis.Redis
) -> None:
    """200 steps issued together go out as one write, not one each (pooled clients send
    each on a connection of its own: 200 reads for Redis)."""
    await steps.execute("PING")
    before = int((await admin.info("stats"))["total_reads_processed"])
    replies = await asyncio.gather(*(steps.execute("SET", f"k{i}", i) for i in range(200)))
    assert replies == [b"OK"] * 200
    reads = int((await admin.info("stats"))["total_reads_processed"]) - before
    assert reads <= 10  # the 200 SETs, and this test's one INFO, in a handful of reads


async def test_a_script_redis_has_forgotten_is_sent_again(
    steps: Multiplexed, admin: aioredis.Redis
) -> None:
    script = steps.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await script(keys=["n"], args=[2]) == 2
    await admin.script_flush()  # as a restart or a failover forgets every script
    assert await script(keys=["n"], args=[3]) == 5
    assert await admin.script_exists(script.sha) == [True]
    assert await script(keys=["n"], args=[4]) == 9


async def test_a_killed_connection_fails_what_waited_and_the_next_step_connects_again(
    steps: Multiplexed, admin: aioredis.Redis
) -> None:
    [connection] = await named_connections(admin)
    waiting = asyncio.ensure_future(steps.execute("BLPOP", "never-filled", 0))
    await admin.client_kill_filter(_id=connection["id"])  # blocked or about to be: it waits
    with pytest.raises(ConnectionError):
        await waiting
    assert await steps.execute("SET", "after", "1") == b"OK"
    assert await admin.get("after") == b"1"


async def test_a_silent_redis_fails_the_waiting_steps_with_a_timeout(admin: aioredis.Redis) -> None:
    steps = Multiplexed(admin.connection_pool, timeout_s=0.2)
    try:
        with pytest.raises(TimeoutError):
            await steps.execute("BLPOP", "never-filled", 0)  # no reply before the timeout
        assert await steps.execute("ECHO", "fresh") == b"fresh"  # on a new connection
    finally:
        await steps.aclose()


async def test_a_cancelled_caller_does_not_take_the_next_callers_reply(
    steps: Multiplexed, admin: aioredis.Redis
) -> None:
    await admin.set("mine", "the next caller's")
    first = asyncio.ensure_future(steps.execute("BLPOP", "never-filled", 0.3))
    await asyncio.sleep(0)  # `first` is queued on the connection
    first.cancel()
    assert await steps.execute("GET", "mine") == b"the next caller's"
    assert first.cancelled()


async def test_steps_fail_with_connection_error_while_redis_is_unreachable() -> None:
    unreachable = aioredis.BlockingConnectionPool.from_url(
        "redis://127.0.0.1:1", socket_connect_timeout=1
    )
    steps = Multiplexed(unreachable, timeout_s=1)
    try:
        failures = await asyncio.gather(
            *(steps.execute("PING") for _ in range(50)), return_exceptions=True
        )
        assert all(isinstance(failure, ConnectionError) for failure in failures)
        with pytest.raises(ConnectionError):  # and the next one tries again
            await steps.execute("PING")
    finally:
        await steps.aclose()
        await unreachable.aclose()


async def test_the_connection_uses_the_urls_password_and_database(own_redis: EmbeddedRedis) -> None:
    """The shared connection is opened and greeted as redis-py opens one for the same URL:
    AUTH with its password, SELECT of its database."""
    url = f"{own_redis.url}?password=s3cret&db=3"
    admin = aioredis.Redis.from_url(own_redis.url)
    await admin.config_set("requirepass", "s3cret")  # this open connection stays signed in
    client = aioredis.Redis.from_url(url)
    steps = Multiplexed(client.connection_pool, timeout_s=10)
    wrong = aioredis.Redis.from_url(f"{own_redis.url}?password=wrong")
    refused = Multiplexed(wrong.connection_pool, timeout_s=10)
    try:
        assert await steps.execute("SET", "where", "database 3") == b"OK"
        assert await client.get("where") == b"database 3"
        assert await admin.get("where") is None  # database 0
        with pytest.raises(ConnectionError, match="password"):  # as redis-py's pool says it
            await refused.execute("PING")
    finally:
        await admin.config_set("requirepass", "")
        for closing in (steps, refused, client, wrong, admin):
            await closing.aclose()
