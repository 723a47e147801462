"""What the fault suites (test_faults, test_takeover, test_workers, the small-body tests)
share: a replayable seed, an upload's lock seen in Redis, finishing an upload through what a
fault leaves behind, and a SIGTERM that lands while a small body is being read."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Mapping

import aiohttp
import redis.asyncio as aioredis

from tests.support.processes import ServerProcess
from tests.support.raw_http import RawRequest, RawResponse, raw_patch, send_until_answered
from tests.support.tus import head_offset, upload_id_of
from tests.support.waiting import wait_until
from tusserver.store.records import redis_key, shard_of

MiB = 2**20
DEADLINE_S = 20.0  # for one upload to get through after a fault (stale locks last ~3 s)


def seeded_random() -> tuple[random.Random, str]:
    """A Random and a note naming its seed (TUS_FAULT_SEED replays a failing run)."""
    seed = int(os.environ.get("TUS_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    return random.Random(seed), f"TUS_FAULT_SEED={seed}"


async def _wait_lock(redis_url: str, url: str, *, held: bool, timeout_s: float) -> None:
    upload_id = upload_id_of(url)
    key = redis_key(shard_of(upload_id), "lock", upload_id)
    client = aioredis.Redis.from_url(redis_url)
    try:

        async def is_as_wanted() -> bool:
            return bool(await client.exists(key)) == held

        what = "a request took the upload's lock" if held else "the upload's lock was let go"
        await wait_until(is_as_wanted, timeout_s, every_s=0.01, what=what)
    finally:
        await client.aclose()


async def wait_lock_held(redis_url: str, url: str, timeout_s: float = 10) -> None:
    """Wait until a request holds the upload's lock."""
    await _wait_lock(redis_url, url, held=True, timeout_s=timeout_s)


async def wait_lock_free(redis_url: str, url: str, timeout_s: float = 10) -> None:
    """Wait until no request holds the upload's lock (a killed holder's lock expires)."""
    await _wait_lock(redis_url, url, held=False, timeout_s=timeout_s)


async def finish_upload(
    http: aiohttp.ClientSession,
    url: str,
    source: bytes,
    *,
    tolerated: tuple[int, ...] = (409, 423, 503),
) -> list[int]:
    """HEAD, then PATCH the rest from the HEAD offset, until the upload has every byte (what
    a tus client does). Retries what a fault leaves behind for a while, the `tolerated`
    answers (423 while a killed holder's lock lasts, 409 when a HEAD raced a commit, 503);
    the statuses seen, the last one 204."""
    seen: list[int] = []

    async def finished() -> bool:  # one attempt
        offset = await head_offset(http, url)
        if offset == len(source) and seen:
            return True
        async with raw_patch(url, offset, len(source) - offset) as request:
            answer = await send_until_answered(request, source[offset:], chunk=MiB)
        assert answer is not None, f"no answer; statuses before: {seen}"
        seen.append(answer.status)
        if answer.status == 204:
            assert int(answer.headers["upload-offset"]) == len(source)
            return True
        assert answer.status in tolerated, (answer.status, answer.body)
        return False

    await wait_until(
        finished, DEADLINE_S, every_s=0.1, what=lambda: f"the upload finished; statuses {seen}"
    )
    return seen


async def sigterm_mid_small_body(
    server: ServerProcess, url: str, method: str, headers: Mapping[str, str], sent: bytes
) -> tuple[RawResponse, int]:
    """Start a small-body request with `Expect: 100-continue`, send `sent` once the handler
    reads the body, and SIGTERM the server once it has read every byte of `sent`; its answer
    (a 503, checked) and the bytes it says it committed, all of `sent` (checked). The server
    has stopped cleanly when this returns."""
    request = await RawRequest.start(url, method, {**headers, "Expect": "100-continue"})
    try:
        assert (await request.response()).status == 100  # the handler is reading the body
        await request.send(sent)
        await wait_until(request.is_read_by_server, what="the server read the bytes sent")
        server.process.send_signal(signal.SIGTERM)
        answer = await request.response(timeout_s=30)
    finally:
        await request.close()
    assert answer.status == 503, answer
    assert int(answer.headers["retry-after"]) > 0
    kept = int(answer.body.split(b"; ")[1].split()[0])  # "...; N bytes are committed"
    assert kept == len(sent), f"{kept} of the {len(sent)} bytes the server had read were kept"
    assert await asyncio.to_thread(server.process.wait, 20) == 0, server.log()
    return answer, kept
