"""Connecting to the Redis that holds upload state (one server, or a Redis Cluster), and
checking that it is one tusserver may use."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from tusserver.store.multiplex import Multiplexed
from tusserver.store.records import SHARD_COUNT

RedisClient = aioredis.Redis | RedisCluster
_CLIENT_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 3, "socket_timeout": 10}
# Connections one process keeps to Redis. When all are busy a command waits for one (up to
# POOL_WAIT_S) instead of failing: thousands of open uploads share them (their lock renewals
# go in one pipeline), so a burst queues for a moment rather than answering 503.
MAX_CONNECTIONS = 64
POOL_WAIT_S = 10.0
RENEWAL_CONNECTIONS = 2  # the lock renewals' own (one pipeline per tick)
READ_CONNECTIONS = 16  # the reads' own on a Redis Cluster (HEAD, downloads: one step each)


async def connect(url: str, max_connections: int = MAX_CONNECTIONS) -> RedisClient:
    """A client for the Redis at `url`, with a bounded pool whose users wait for a free
    connection: a cluster-aware one when that server is a node of a Redis Cluster (every
    step of ours touches one slot, so the layout works unchanged)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S,
        health_check_interval=30, **_CLIENT_OPTIONS,
    )  # fmt: skip
    client = aioredis.Redis.from_pool(pool)  # closing the client closes its pool
    try:
        info = await client.info("cluster")
    except aioredis.ResponseError:  # INFO restricted on some hosted Redis: a single node
        return client
    except BaseException:
        await client.aclose()
        raise
    if not info.get("cluster_enabled"):
        return client
    await client.aclose()
    cluster = RedisCluster.from_url(url, **_CLIENT_OPTIONS)
    await cluster.initialize()
    return cluster


@dataclass(frozen=True)
class Connections:
    """The Redis connections of one process: the pooled `client` (listings, sweeps, batches,
    events), the lock renewals' own, and for the steps of uploads one multiplexed connection
    (`steps`, store/multiplex.py) on a single server, or on a Redis Cluster (whose steps go
    to the node of their slot through `client`) a pool for the reads of one upload."""

    client: RedisClient
    renewals: RedisClient
    steps: Multiplexed | None
    reads: RedisClient | None


@contextlib.asynccontextmanager
async def connections(url: str) -> AsyncIterator[Connections]:
    """`Connections` to the Redis at `url`, closed after."""
    async with contextlib.AsyncExitStack() as closing:
        client = await connect(url)
        closing.push_async_callback(client.aclose)
        renewals = await connect(url, max_connections=RENEWAL_CONNECTIONS)
        closing.push_async_callback(renewals.aclose)
        if isinstance(client, RedisCluster):
            reads = await connect(url, max_connections=READ_CONNECTIONS)
            closing.push_async_callback(reads.aclose)
            yield Connections(client, renewals, steps=None, reads=reads)
            return
        steps = Multiplexed(client.connection_pool, timeout_s=_CLIENT_OPTIONS["socket_timeout"])
        closing.push_async_callback(steps.aclose)
        yield Connections(client, renewals, steps=steps, reads=None)


async def check_layout(client: RedisClient) -> None:
    """Record the shard count at first start; refuse (RuntimeError) a Redis laid out with
    another one, or one that may evict keys."""
    await client.set("tus:config:shards", SHARD_COUNT, nx=True)
    stored = int(await client.get("tus:config:shards") or SHARD_COUNT)
    if stored != SHARD_COUNT:
        raise RuntimeError(
            f"this Redis holds uploads laid out in {stored} shards, this tusserver "
            f"uses {SHARD_COUNT}; the shard count can never change"
        )
    try:
        policy = await client.config_get("maxmemory-policy")
    except aioredis.ResponseError:  # CONFIG is disabled on some hosted Redis
        return
    value = policy.get("maxmemory-policy", b"noeviction")
    value = value.decode() if isinstance(value, bytes) else str(value)
    if value != "noeviction":
        raise RuntimeError(
            f"Redis has maxmemory-policy {value}: it could evict upload state; set it to noeviction"
        )
