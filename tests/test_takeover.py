"""Several processes on one upload: PATCHes alternating between two processes, two PATCHes
racing at one offset, and a new PATCH taking an upload over from a half-dead connection.

Two `tusserver` processes share one Redis (--redis-url) and one --data-dir, as an operator
runs them behind a load balancer. The takeover times measured here are printed and written to
takeover.json in the test's tmp_path (they are reported, never asserted).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import statistics
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.faults import MiB, finish_upload, seeded_random, wait_lock_held
from tests.support.files import file_of
from tests.support.processes import ServerProcess, StartProcess, on, start_server
from tests.support.raw_http import raw_patch, send_until_answered
from tests.support.tus import (
    completed_digest,
    create_upload,
    head,
    head_offset,
    patch_headers,
    repr_digest_of,
)
from tests.support.waiting import wait_until
from tusserver.store.embedded import EmbeddedRedis

# a server killed mid-test must leave no stale pooled connection behind
pytestmark = pytest.mark.fresh_connections


async def two_servers(
    processes: StartProcess, data_dir: Path, redis_url: str
) -> tuple[ServerProcess, ServerProcess]:
    first, second = await asyncio.gather(
        start_server(processes, data_dir, "--redis-url", redis_url),
        start_server(processes, data_dir, "--redis-url", redis_url),
    )
    return first, second


# -- 3: PATCHes alternate between two processes ------------------------------------------


async def test_patches_alternating_between_two_processes_give_the_exact_bytes(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    rng, seed = seeded_random()
    servers = await two_servers(processes, tmp_path / "data", own_redis.url)
    source = rng.randbytes(9 * MiB + rng.randrange(MiB))
    url = await create_upload(http, servers[0].url, len(source))
    cuts = [*sorted(rng.sample(range(1, len(source)), 7)), len(source)]
    offset = 0
    for turn, cut in enumerate(cuts):
        server = servers[turn % 2]
        body = io.BytesIO(source[offset:cut])
        async with http.patch(on(server, url), data=body, headers=patch_headers(offset)) as answer:
            assert answer.status == 204, (await answer.text(), seed)
            assert int(answer.headers["Upload-Offset"]) == cut
        # both processes see the same committed offset
        assert [await head_offset(http, on(each, url)) for each in servers] == [cut, cut]
        offset = cut
    for server in servers:
        assert await completed_digest(http, on(server, url)) == repr_digest_of(source), seed
    assert file_of(tmp_path / "data", url).read_bytes() == source, seed


# -- 4: two PATCHes race at the same offset on two processes -----------------------------


async def test_racing_patches_on_two_processes_keep_a_prefix_of_one_body(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    rng, seed = seeded_random()
    servers = await two_servers(processes, tmp_path / "data", own_redis.url)
    length = 6 * MiB
    bodies = (b"\x01" * length, b"\x02" * length)  # any mix of the two would show
    outcomes: set[tuple[int, int]] = set()
    for _ in range(6):
        url = await create_upload(http, servers[0].url, length)
        # both requests are open before either sends a body byte
        async with (
            raw_patch(on(servers[0], url), 0, length) as first,
            raw_patch(on(servers[1], url), 0, length) as second,
        ):
            pauses = (rng.choice([0.0, 0.002, 0.01]), rng.choice([0.0, 0.002, 0.01]))
            answers = await asyncio.gather(
                send_until_answered(first, bodies[0], chunk=128 * 1024, pause_s=pauses[0]),
                send_until_answered(second, bodies[1], chunk=128 * 1024, pause_s=pauses[1]),
            )
        statuses = [answer.status if answer else 0 for answer in answers]
        assert all(status in (204, 400, 409, 423) for status in statuses), (statuses, seed)
        assert statuses.count(204) <= 1, (statuses, seed)
        committed = await head_offset(http, on(servers[0], url))
        kept = file_of(tmp_path / "data", url).read_bytes()[:committed]
        assert kept in (bodies[0][:committed], bodies[1][:committed]), (statuses, seed)
        for answer, body in zip(answers, bodies, strict=True):
            assert answer is not None
            if answer.status == 204:  # the winner's body, whole
                assert committed == length and kept == body, (statuses, seed)
            if answer.status in (400, 409):  # either says where the upload is
                assert int(answer.headers["upload-offset"]) <= committed, (statuses, seed)
        outcomes.add((statuses[0], statuses[1]))
    print(f"{seed}: outcomes {sorted(outcomes)}")


# -- 7: a new PATCH takes over from a half-dead connection -------------------------------


async def test_a_new_patch_takes_over_from_a_half_dead_connection(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    servers = await two_servers(processes, tmp_path / "data", own_redis.url)
    takeover_s: list[float] = []
    old_answer_s: list[float] = []
    for attempt in range(5):
        source = os.urandom(8 * MiB)
        url = await create_upload(http, servers[0].url, len(source))
        old_server, new_server = servers[attempt % 2], servers[1 - attempt % 2]
        sent = 1536 * 1024
        # the old client sent part of a long body, then went silent without closing
        async with raw_patch(on(old_server, url), 0, len(source)) as old:
            await old.send(source[:sent])
            await wait_lock_held(own_redis.url, url)
            resume_at = await head_offset(http, on(new_server, url))
            started = time.monotonic()
            # a short PATCH (64 KiB, whole) so its answer times the takeover, not a transfer
            async with raw_patch(on(new_server, url), resume_at, 64 * 1024) as new:
                answer = await send_until_answered(new, source[resume_at : resume_at + 64 * 1024])
                takeover_s.append(time.monotonic() - started)
            old_answer = await old.response()
            old_answer_s.append(time.monotonic() - started)
        assert old_answer.status == 400, old_answer
        committed = int(old_answer.headers["upload-offset"])
        assert committed == sent  # the old PATCH kept every byte it had read
        assert answer is not None
        if resume_at == committed:  # HEAD had the holder commit what it held first
            assert answer.status == 204, answer
        else:  # HEAD saw an older offset: 409 names the right one
            assert answer.status == 409, answer
            assert int(answer.headers["upload-offset"]) == committed
        assert await finish_upload(http, on(new_server, url), source)
        assert await completed_digest(http, on(new_server, url)) == repr_digest_of(source)
    record = {
        "what": "a new PATCH on another process, from its start to its answer, while the old "
        "PATCH's connection is open but silent (5 runs)",
        "takeover_s": [round(s, 4) for s in takeover_s],
        "takeover_median_s": round(statistics.median(takeover_s), 4),
        "old_connection_answered_median_s": round(statistics.median(old_answer_s), 4),
    }
    (tmp_path / "takeover.json").write_text(json.dumps(record, indent=2) + "\n")
    print(record)


async def test_head_during_a_running_patch_shows_the_bytes_that_arrived(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    server = await start_server(processes, tmp_path / "data", "--redis-url", own_redis.url)
    source = os.urandom(16 * MiB)
    url = await create_upload(http, server.url, len(source))
    async with raw_patch(url, 0, len(source)) as running:
        await running.send(source[: 2 * MiB])
        await wait_lock_held(own_redis.url, url)
        # each HEAD asks the running PATCH to commit and waits for its answer
        offset = 0

        async def shows_bytes() -> bool:
            nonlocal offset
            offset = await head_offset(http, url)
            return offset > 0

        await wait_until(shows_bytes, 3, every_s=0.05, what="HEAD showed bytes that arrived")
        assert offset <= 2 * MiB, f"HEAD says {offset} after 2 MiB were sent"
        response = await head(http, url)
        assert response.headers["Cache-Control"] == "no-store"
