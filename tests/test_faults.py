"""Faults: resumes survive SIGKILL, SIGTERM, dropped connections, a Redis restart and a full
disk, with the exact bytes at the end.

Real `tusserver` processes on real sockets, real Redis, real files. Random points come from one
seed per test, printed on failure (set TUS_FAULT_SEED to replay one). Other files of this
suite: test_takeover.py (two processes on one upload), test_workers.py (--workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.support import faultfs
from tests.support.faults import (
    DEADLINE_S,
    MiB,
    finish_upload,
    seeded_random,
    wait_lock_free,
    wait_lock_held,
)
from tests.support.files import file_of
from tests.support.processes import StartProcess, on, pid_is_gone, start_server
from tests.support.raw_http import (
    RawRequest,
    RawResponse,
    raw_patch,
    send_until_answered,
    stream_paced,
)
from tests.support.servers import ServerFactory
from tests.support.tools import require_tool
from tests.support.tus import (
    TUS,
    completed_digest,
    create_upload,
    head,
    head_offset,
    patch_headers,
    repr_digest_of,
)
from tests.support.waiting import NotReached, wait_until
from tusserver.store.embedded import EmbeddedRedis

BLOCK_BYTES = 4 * MiB  # the server writes a body in blocks of this size

# a server killed mid-test must leave no stale pooled connection behind
pytestmark = pytest.mark.fresh_connections


async def offset_when(
    http: aiohttp.ClientSession, url: str, expected: int, timeout_s: float = 5
) -> int:
    """The committed offset once it is `expected` (a request whose client hung up ends on its
    own time), or the last one seen when the deadline passes."""

    async def is_expected() -> bool:
        return await head_offset(http, url) == expected

    with contextlib.suppress(NotReached):  # the caller says what it expected
        await wait_until(is_expected, timeout_s)
    return await head_offset(http, url)


def embedded_redis_url(data_dir: Path) -> str:
    return f"unix://{data_dir / 'redis' / 'valkey.sock'}"


# -- 1: SIGKILL at random points of many uploads ------------------------------------------

KILL_ROUNDS = 3
SLOW_CHUNK = 64 * 1024
SLOW_PAUSE_S = 0.02  # about 3 MiB/s per upload: a 4 MiB block takes longer than a commit interval


async def stream_until(url: str, source: bytes, offset: int, stop_at: int) -> RawRequest:
    """Open a PATCH for the rest of the upload and send, slowly, up to `stop_at`; the open
    request (the caller closes it)."""
    request = await RawRequest.patch(url, offset, len(source) - offset)
    try:
        await stream_paced(request, source[offset:stop_at], chunk=SLOW_CHUNK, pause_s=SLOW_PAUSE_S)
    except BaseException:
        await request.close()
        raise
    return request


async def test_sigkill_at_random_points_then_resume_gives_the_exact_bytes(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
) -> None:
    rng, seed = seeded_random()
    data_dir = tmp_path_factory.mktemp("kill") / "data"  # short: the Valkey socket lives here
    server = await start_server(processes, data_dir)
    sources = [rng.randbytes(rng.randrange(3 * MiB, 7 * MiB)) for _ in range(8)]
    urls = [await create_upload(http, server.url, len(source)) for source in sources]
    offsets = [0] * len(sources)
    resumed_mid_upload = 0
    for _ in range(KILL_ROUNDS):
        # every upload sends up to its own random byte, then the server dies
        stops = [
            rng.randrange(offset + 1, len(source))
            for offset, source in zip(offsets, sources, strict=True)
        ]
        await asyncio.gather(*(wait_lock_free(embedded_redis_url(data_dir), url) for url in urls))
        streams = await asyncio.gather(
            *(
                stream_until(on(server, url), source, offset, stop)
                for url, source, offset, stop in zip(urls, sources, offsets, stops, strict=True)
            )
        )
        server.stop(signal.SIGKILL)
        for stream in streams:
            await stream.close()
        server = await start_server(processes, data_dir)  # adopts the orphaned Valkey
        after = await asyncio.gather(*(head_offset(http, on(server, url)) for url in urls))
        for index, (url, source) in enumerate(zip(urls, sources, strict=True)):
            committed = after[index]
            on_disk = file_of(data_dir, url).read_bytes()
            where = f"upload {index}, {seed}"
            assert offsets[index] <= committed <= stops[index], where
            assert len(on_disk) >= committed, where
            assert on_disk[:committed] == source[:committed], where
            resumed_mid_upload += committed > offsets[index]
        offsets = after
    for url, source in zip(urls, sources, strict=True):
        await finish_upload(http, on(server, url), source)
    for index, (url, source) in enumerate(zip(urls, sources, strict=True)):
        # hashed in the background: no process saw every byte of these uploads
        assert await completed_digest(http, on(server, url)) == repr_digest_of(source), seed
        assert file_of(data_dir, url).read_bytes() == source, f"upload {index}, {seed}"
    print(f"{seed}: {resumed_mid_upload} resumes started past the previous offset")


# -- 2: connections dropped at random byte positions --------------------------------------


async def test_dropped_connections_at_random_points_resume_to_the_exact_bytes(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    rng, seed = seeded_random()
    server = await start_server(processes, tmp_path / "data", "--redis-url", own_redis.url)
    source = rng.randbytes(10 * MiB + rng.randrange(MiB))
    url = await create_upload(http, server.url, len(source))
    offset = 0
    for _ in range(6):
        remaining = len(source) - offset
        cut = rng.randrange(1, min(remaining, 6 * MiB))
        async with raw_patch(url, offset, remaining) as request:  # full Content-Length ...
            await stream_paced(request, source[offset : offset + cut], chunk=256 * 1024)
        # ... then the client hangs up: the server keeps every byte that reached it
        committed = await offset_when(http, url, offset + cut)
        assert committed == offset + cut, f"{committed - offset} of {cut} bytes kept; {seed}"
        on_disk = file_of(server.data_dir, url).read_bytes()
        assert on_disk[:committed] == source[:committed], seed
        offset = committed
    await finish_upload(http, url, source)
    assert await completed_digest(http, url) == repr_digest_of(source), seed
    assert file_of(server.data_dir, url).read_bytes() == source, seed


async def test_a_hang_up_keeps_the_bytes_that_reached_the_server(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    server = await start_server(processes, tmp_path / "data", "--redis-url", own_redis.url)
    source = os.urandom(2 * MiB)
    url = await create_upload(http, server.url, len(source))
    body = source[: 200 * 1024]
    # A half-open PATCH holds the lock, so the next PATCH waits (>= one 20 ms poll) before
    # it reads its body: by then its whole body, and the hang-up, have reached the server.
    async with raw_patch(url, 0, len(source)) as holder:
        await wait_lock_held(own_redis.url, url)
        hang_up = await RawRequest.start(
            url, "PATCH", {**patch_headers(0), "Content-Length": str(len(source))}
        )
        await hang_up.send(body)
        await hang_up.close()
        answer = await holder.response()
        assert answer.status == 400  # interrupted by the newer request, nothing committed
        assert answer.headers["upload-offset"] == "0"
    # (the hung-up PATCH ends on its own time: nobody is left to hear its answer)
    kept = await offset_when(http, url, len(body))
    assert kept == len(body), f"{kept} of the {len(body)} bytes that reached the server kept"


# -- 5: Redis restarts in the middle of an upload -----------------------------------------


async def test_redis_restart_mid_upload_answers_503_then_resumes_from_the_last_commit(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    redis_url = own_redis.url
    server = await start_server(processes, tmp_path / "data", "--redis-url", redis_url)
    source = os.urandom(6 * MiB)
    url = await create_upload(http, server.url, len(source))
    async with http.patch(url, data=io.BytesIO(source[:MiB]), headers=patch_headers(0)) as first:
        assert first.status == 204
    async with raw_patch(url, MiB, len(source) - MiB) as running:
        await running.send(source[MiB : 3 * MiB])
        await asyncio.to_thread(own_redis.stop)  # SIGTERM: the AOF is flushed
        # the running PATCH cannot renew its lock: it stops, commits nothing, says retry
        answer = await running.response(timeout_s=15)
        assert answer.status == 503, answer
        assert int(answer.headers["retry-after"]) > 0
    response = await head(http, url)
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0
    async with http.patch(url, data=b"x" * 1024, headers=patch_headers(MiB)) as refused:
        assert refused.status == 503
        assert int(refused.headers["Retry-After"]) > 0
    await asyncio.to_thread(own_redis.start)  # same files, same socket path
    assert own_redis.url == redis_url

    async def answers_again() -> bool:
        status = (await head(http, url)).status
        assert status in (200, 503), status
        return status == 200

    await wait_until(answers_again, every_s=0.05, what="HEAD answered 200 after the restart")
    assert await head_offset(http, url) == MiB  # the last commit before the outage
    assert await finish_upload(http, url, source) == [204]
    assert await completed_digest(http, url) == repr_digest_of(source)
    assert file_of(server.data_dir, url).read_bytes() == source
    assert server.process.poll() is None  # it rode out the outage


# -- 6: a full disk, and --min-free-disk -------------------------------------------------


@pytest.fixture
def small_disk_ok() -> None:
    reason = faultfs.small_tmpfs_unavailable()
    require_tool(reason is None, reason or "")


@pytest.mark.usefixtures("small_disk_ok")
async def test_a_full_disk_answers_507_and_keeps_the_last_commit(
    tmp_path: Path, own_redis: EmbeddedRedis, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(12 * MiB)
    data_dir = tmp_path / "small"
    with faultfs.server_on_small_disk(data_dir, "8m", "--redis-url", own_redis.url) as server:
        url = await create_upload(http, server.url, len(source))
        other = await create_upload(http, server.url, MiB)
        async with http.patch(url, data=io.BytesIO(source[: 3 * MiB]), headers=patch_headers(0)):
            pass
        assert await head_offset(http, url) == 3 * MiB
        # 9 MiB more cannot fit in the 5 MiB left
        async with raw_patch(url, 3 * MiB, 9 * MiB) as request:
            answer = await send_until_answered(request, source[3 * MiB :])
        assert answer is not None, "no answer to the PATCH that filled the disk"
        assert answer.status == 507
        assert b"disk is full" in answer.body
        committed = await head_offset(http, url)
        assert committed in (3 * MiB, 7 * MiB)  # a commit may fall on the first 4 MiB block
        on_disk = faultfs.seen_by(server, file_of(data_dir, url)).read_bytes()
        assert on_disk[:committed] == source[:committed]
        assert (await head(http, other)).status == 200  # the other upload is fine

        # the next PATCH cuts the uncommitted bytes off, which frees the disk again
        resumed = io.BytesIO(source[committed : committed + MiB])
        async with http.patch(url, data=resumed, headers=patch_headers(committed)) as response:
            assert response.status == 204
        async with http.patch(other, data=os.urandom(MiB), headers=patch_headers(0)) as response:
            assert response.status == 204
        on_disk = faultfs.seen_by(server, file_of(data_dir, url)).read_bytes()
        assert on_disk == source[: committed + MiB]


@pytest.mark.usefixtures("small_disk_ok")
async def test_a_hang_up_whose_bytes_find_the_disk_full_keeps_the_last_commit_and_says_why(
    tmp_path: Path, own_redis: EmbeddedRedis, http: aiohttp.ClientSession
) -> None:
    """The bytes of a body cut short are written and committed at its end; when that write
    fails the offset stays where it was, and the log tells the operator why."""
    source = os.urandom(9 * MiB)
    data_dir = tmp_path / "small"
    with faultfs.server_on_small_disk(data_dir, "8m", "--redis-url", own_redis.url) as server:
        url = await create_upload(http, server.url, len(source))
        first = io.BytesIO(source[: 5 * MiB])
        async with http.patch(url, data=first, headers=patch_headers(0)) as response:
            assert response.status == 204
        # 3.5 MiB of a 4 MiB body, less than one block: none of it is written before the
        # hang-up, and under 3 MiB are left on the disk
        async with raw_patch(url, 5 * MiB, 4 * MiB) as request:
            await request.send(source[5 * MiB : 5 * MiB + 7 * MiB // 2])

        def told() -> bool:
            return "was not kept, the offset stays at 5242880" in server.log()

        await wait_until(told, what="the log line on the bytes not kept")
        assert "the disk is full" in server.log() or "low on disk space" in server.log()
        assert await head_offset(http, url) == 5 * MiB
        resumed = io.BytesIO(source[5 * MiB : 6 * MiB])  # cut back: the disk has room again
        async with http.patch(url, data=resumed, headers=patch_headers(5 * MiB)) as response:
            assert response.status == 204
        on_disk = faultfs.seen_by(server, file_of(data_dir, url)).read_bytes()
        assert on_disk == source[: 6 * MiB]


@pytest.mark.usefixtures("small_disk_ok")
async def test_min_free_disk_refuses_a_write_before_the_disk_is_full(
    tmp_path: Path, own_redis: EmbeddedRedis, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(4 * MiB)
    data_dir = tmp_path / "small"
    with faultfs.server_on_small_disk(
        data_dir, "8m", "--redis-url", own_redis.url, "--min-free-disk", "5MiB"
    ) as server:
        url = await create_upload(http, server.url, len(source))
        async with http.patch(url, data=source[:MiB], headers=patch_headers(0)) as response:
            assert response.status == 204  # 7 MiB stay free
        # 3 MiB more would leave 4 MiB free, under the minimum: refused before writing
        async with raw_patch(url, MiB, 3 * MiB) as request:
            answer = await send_until_answered(request, source[MiB:])
        assert answer is not None and answer.status == 507
        assert b"low on disk space" in answer.body
        assert await head_offset(http, url) == MiB
        assert faultfs.seen_by(server, file_of(data_dir, url)).stat().st_size == MiB


async def test_min_free_disk_above_the_free_space_refuses_new_uploads(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(min_free_disk_bytes=2**60)
    async with http.post(server.url, headers={**TUS, "Upload-Length": "10"}) as response:
        assert response.status == 507
        assert "low on disk space" in await response.text()


# -- 8: SIGKILL durability ---------------------------------------------------------------


async def test_after_sigkill_the_committed_bytes_are_on_disk_and_the_upload_resumes(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
) -> None:
    """One run, with the default --fsync: a killed process leaves what it wrote in the page
    cache, so every --fsync setting keeps the same bytes here (only a machine crash tells them
    apart; test_durability.py checks --fsync from the system calls)."""
    data_dir = tmp_path_factory.mktemp("durable") / "data"
    server = await start_server(processes, data_dir)
    source = os.urandom(11 * MiB)
    url = await create_upload(http, server.url, len(source))
    path = file_of(data_dir, url)
    async with raw_patch(url, 0, len(source)) as request:
        await request.send(source[: 9 * MiB])
        await wait_until(
            lambda: path.stat().st_size >= 2 * BLOCK_BYTES,
            what="the server wrote its second 4 MiB block",
        )
        server.stop(signal.SIGKILL)
    written = path.stat().st_size

    server = await start_server(processes, data_dir)
    url = on(server, url)
    committed = await head_offset(http, url)
    assert committed <= written
    assert path.read_bytes()[:committed] == source[:committed]
    statuses = await finish_upload(http, url, source)  # 423s while the dead holder's lock lasts
    assert await completed_digest(http, url) == repr_digest_of(source)
    assert path.read_bytes() == source  # the uncommitted tail was cut, then written again
    print(f"committed {committed} of {written} bytes on disk; then {statuses}")


# -- 9: SIGTERM -------------------------------------------------------------------------


async def test_sigterm_commits_what_arrived_answers_503_and_stops_its_valkey(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
) -> None:
    data_dir = tmp_path_factory.mktemp("term") / "data"
    server = await start_server(processes, data_dir)
    valkey_pid = int((data_dir / "redis" / "valkey.pid").read_text())
    source = os.urandom(8 * MiB)
    url = await create_upload(http, server.url, len(source))
    path = file_of(data_dir, url)
    async with raw_patch(url, 0, len(source)) as request:
        await stream_paced(request, source[: 5 * MiB], chunk=SLOW_CHUNK, pause_s=0.002)
        await wait_until(
            lambda: path.stat().st_size >= BLOCK_BYTES,
            what="the server wrote its first 4 MiB block",
        )
        server.process.send_signal(signal.SIGTERM)
        try:
            answer: RawResponse | None = await request.response(timeout_s=15)
        except (OSError, asyncio.IncompleteReadError):
            answer = None  # the connection closed: also fine for a client
    assert answer is None or answer.status == 503, answer
    if answer is not None:
        assert int(answer.headers["retry-after"]) > 0
    assert await asyncio.to_thread(server.process.wait, 20) == 0, server.log()
    assert pid_is_gone(valkey_pid), "the embedded Valkey outlived its supervisor"

    server = await start_server(processes, data_dir)
    url = on(server, url)
    committed = await head_offset(http, url)
    assert BLOCK_BYTES <= committed <= 5 * MiB  # everything read before SIGTERM is kept
    assert path.read_bytes()[:committed] == source[:committed]
    assert await finish_upload(http, url, source) == [204]  # no stale lock: it let go
    assert await completed_digest(http, url) == repr_digest_of(source)


# -- an idle timeout that fires in the middle of a block write ---------------------------


async def test_an_idle_timeout_during_a_block_write_keeps_the_sha256_right(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    # A 4 ms idle timeout never fires between chunks of a fast local client, but it does while
    # the server writes and hashes a 4 MiB block (a slow disk does the same to --idle-timeout
    # 1s). The resumed PATCHes run on the same process, which reuses its running hash.
    server = await start_server(
        processes, tmp_path / "data", "--redis-url", own_redis.url, "--idle-timeout", "4ms"
    )
    source = os.urandom(24 * MiB)
    url = await create_upload(http, server.url, len(source))
    statuses: list[int] = []

    async def has_every_byte() -> bool:  # else one more PATCH from the committed offset
        offset = await head_offset(http, url)
        if offset == len(source):
            return True
        async with raw_patch(url, offset, len(source) - offset) as request:
            answer = await send_until_answered(request, source[offset:], chunk=MiB)
        assert answer is not None and answer.status in (204, 408), answer
        statuses.append(answer.status)
        return False

    await wait_until(has_every_byte, DEADLINE_S, every_s=0, what=lambda: f"statuses {statuses}")
    assert file_of(server.data_dir, url).read_bytes() == source
    assert await completed_digest(http, url) == repr_digest_of(source), f"after {statuses}"
