"""Connecting to the Redis that holds upload state (one server, or a Redis Cluster), and
checking that it is one tusserver may use."""

from __future__ import annotations

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


def multiplexed(client: RedisClient) -> Multiplexed | None:
    """One shared connection for the steps of uploads (store/multiplex.py) to the Redis of
    `client`, when that is a single server; None on a Redis Cluster, whose steps go to the
    node of their slot through `client` itself."""
    if isinstance(client, RedisCluster):
        return None
    return Multiplexed(client.connection_pool, timeout_s=_CLIENT_OPTIONS["socket_timeout"])


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
