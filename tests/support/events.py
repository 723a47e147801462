"""The event stream of an upload's shard, read straight from Redis, as the parent would."""

from __future__ import annotations

from typing import cast

import redis.asyncio

from tusserver.store.records import keys_of


async def events_of(redis_url: str, upload_id: str) -> list[dict[str, str]]:
    """The fields of every event of `upload_id`, oldest first."""
    [stream] = keys_of(upload_id, "events")
    async with redis.asyncio.Redis.from_url(redis_url, decode_responses=True) as client:
        entries = cast(list[tuple[str, dict[str, str]]], await client.xrange(stream))
    return [fields for _id, fields in entries if fields.get("upload_id") == upload_id]


async def event_types(redis_url: str, upload_id: str) -> list[str]:
    """The types of the events of `upload_id` (`created`, `completed`, ...), oldest first."""
    return [fields["type"] for fields in await events_of(redis_url, upload_id)]


async def all_events(redis_url: str) -> list[dict[str, str]]:
    """The fields of every event in every shard's stream (each stream oldest first)."""
    found: list[dict[str, str]] = []
    async with redis.asyncio.Redis.from_url(redis_url, decode_responses=True) as client:
        async for stream in client.scan_iter(match="tus:{*}:events", _type="stream"):
            entries = cast(list[tuple[str, dict[str, str]]], await client.xrange(stream))
            found += [fields for _id, fields in entries]
    return found
