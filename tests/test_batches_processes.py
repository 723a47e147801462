"""A batch sent by many clients at once through two tusserver processes on one Redis: its
members complete on both processes at the same moments, some of them hashed in the
background after a resume on the other process, and the batch completes exactly once; its
`batch.completed` event reaches a real webhook receiver at least once, with the same id and
body at every try."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import redis.asyncio
from aiohttp import web

from tests.support.processes import ServerProcess
from tests.support.tus import TUS, patch, upload_id_of
from tests.support.waiting import wait_until
from tests.support.webhooks import Received, Receiver
from tusserver.store.records import batch_key_of, redis_key, shard_of

SMALL_FILES = 200
LARGE_FILES = 3
LARGE_BYTES = 12 * 2**20
CHUNK = 3 * 2**20


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def send(
    http: aiohttp.ClientSession, endpoints: list[str], number: int, name: str, path: str,
    data: bytes,
) -> str:  # fmt: skip
    """Create the member on one process and send its PATCHes alternately to both."""
    first = endpoints[number % 2]
    headers = {
        **TUS, "Upload-Length": str(len(data)),
        "Upload-Metadata": metadata(batch=name, relativePath=path),
    }  # fmt: skip
    async with http.post(first, headers=headers) as response:
        assert response.status == 201, await response.text()
        location = response.headers["Location"]
    for index, offset in enumerate(range(0, len(data), CHUNK)):
        # the same upload through the other process: its URL names the first one's port
        endpoint = endpoints[(number + index) % 2]
        url = endpoint + upload_id_of(location)
        answer = await patch(http, url, offset, data[offset : offset + CHUNK])
        assert answer.status == 204, answer
    return upload_id_of(location)


async def test_two_processes_complete_a_big_batch_once_and_deliver_its_event(
    flushed_redis: str,
    tmp_path: Path,
    processes: Callable[..., ServerProcess],
    http: aiohttp.ClientSession,
) -> None:
    tries: dict[str, int] = {}

    def answer(received: Received) -> web.Response:
        """The parent fails the batch event's first try (its answer lost, say)."""
        event = received.json
        if event["type"] != "batch.completed":
            return web.Response(status=204)
        tries[event["id"]] = tries.get(event["id"], 0) + 1
        return web.Response(status=503 if tries[event["id"]] == 1 else 204)

    receiver = Receiver(answer=answer)
    await receiver.start()
    try:
        args = ("--redis-url", flushed_redis, "--webhook-url", receiver.url,
                "--webhook-timeout", "1s")  # fmt: skip
        pair = await asyncio.gather(
            asyncio.to_thread(processes, tmp_path / "data", *args),
            asyncio.to_thread(processes, tmp_path / "data", *args),
        )
        endpoints = [proc.url for proc in pair]
        generator = random.Random(23)
        files = {
            f"small/{n // 50}/f{n}.txt": generator.randbytes(n * 7) for n in range(SMALL_FILES)
        }
        files |= {f"large/{n}.bin": generator.randbytes(LARGE_BYTES) for n in range(LARGE_FILES)}
        async with http.post(endpoints[0] + "batches", json={"files": len(files)}) as response:
            assert response.status == 201
            name = (await response.json())["id"]

        limit = asyncio.Semaphore(24)

        async def member(number: int, path: str, data: bytes) -> tuple[str, str]:
            async with limit:
                return path, await send(http, endpoints, number, name, path, data)

        ids = dict(
            await asyncio.gather(
                *(member(n, path, data) for n, (path, data) in enumerate(files.items()))
            )
        )

        def delivered() -> list[Received]:
            return [r for r in receiver.accepted if r.json["type"] == "batch.completed"]

        await wait_until(lambda: len(delivered()) >= 1, 60, what="the batch event delivered")
        [event] = [r.json for r in delivered()]
        attempts = [r for r in receiver.requests if r.json["type"] == "batch.completed"]
        # one event, sent twice: the same id and the same bytes at each try
        assert {r.json["id"] for r in attempts} == {event["id"]}
        assert len({r.body for r in attempts}) == 1 and len(attempts) >= 2
        assert event["batch"] == name and event["files"] == len(files)
        assert event["bytes"] == sum(len(data) for data in files.values())
        members = {m["path"]: m for m in event["members"]}
        assert set(members) == set(files)
        for path, data in files.items():
            assert members[path]["id"] == ids[path]
            assert members[path]["length"] == len(data)
            assert members[path]["sha256"] == hashlib.sha256(data).hexdigest()
            assert members[path]["metadata"]["relativePath"] == path

        async with http.get(endpoints[1] + f"batches/{name}") as response:
            view: dict[str, Any] = await response.json()
        assert view["state"] == "completed"
        assert view["progress"]["files_completed"] == len(files)
        # exactly one batch event was ever written (the delivered ones are acknowledged and
        # deleted from the stream, so count what is left plus what was delivered)
        stream = redis_key(shard_of(batch_key_of("anonymous", name)), "events")
        async with redis.asyncio.Redis.from_url(flushed_redis, decode_responses=True) as client:
            entries = cast(list[tuple[str, dict[str, str]]], await client.xrange(stream))
        left = [f for _id, f in entries if f["type"] == "batch.completed"]
        assert len(left) + len({r.json["id"] for r in delivered()}) == 1

        # every member's own completed event was delivered too
        def members_delivered() -> set[str]:
            return {r.json["upload_id"] for r in receiver.accepted if r.json["type"] == "completed"}

        await wait_until(
            lambda: members_delivered() == set(ids.values()), 30, what="the members' events"
        )
    finally:
        await receiver.stop()
