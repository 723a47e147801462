"""Large bodies read straight from their sockets in threads (`files/receive.py`), and the
same behaviours on the event loop (`--receive-threads 0`), one upload model for both.

Each behaviour of a body that the loop path has (exact bytes and digest, a hang-up keeping
what arrived, a takeover, a stall, a failed checksum, a graceful stop, --min-free-disk) runs
on both paths. Which path a body took shows while it arrives: a receiving thread is busy.
A body read to its end leaves its connection serving the next request on both paths.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import sys
import threading
from pathlib import Path

import aiohttp
import pytest

from tests.support.raw_http import RawRequest, raw_patch
from tests.support.servers import Server, ServerFactory
from tests.support.tus import (
    completed_digest,
    create_upload,
    head_offset,
    patch_headers,
    path_of,
    repr_digest_of,
    upload_id_of,
)
from tests.support.waiting import wait_until
from tusserver.files.disk import BULK_NICENESS
from tusserver.files.storage import Storage
from tusserver.uploads.body import FEW_BODIES

MiB = 2**20
TUS_LINE = "Tus-Resumable: 1.0.0\r\n"
# Bodies of a MiB or more read in threads (the default: 16 MiB), or none at all.
PATHS: dict[str, dict[str, int]] = {
    "thread": {"receive_min_bytes": MiB},
    "loop": {"receive_threads": 0},
}


@pytest.fixture(params=sorted(PATHS))
def path(request: pytest.FixtureRequest) -> str:
    """How large bodies are read: "thread" or "loop"."""
    name: str = request.param
    return name


async def start(make_server: ServerFactory, path: str, **settings: object) -> Server:
    return await make_server(**PATHS[path], **settings)


async def upload_on(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str, size: int,
    **settings: object,
) -> tuple[Server, bytes, str]:  # fmt: skip
    """A server reading large bodies by `path`, `size` random bytes and an upload for them."""
    server = await start(make_server, path, **settings)
    source = os.urandom(size)
    return server, source, await create_upload(http, server.url, size)


async def send_on_path(request: RawRequest, data: bytes, path: str, server: Server) -> None:
    """Send `data`, seeing while its last byte is held back that `path` reads it."""
    await request.send(data[:-1])
    await until_read(request)
    assert_read_by(path, server)
    await request.send(data[-1:])


def assert_read_by(path: str, server: Server) -> None:
    """While a body arrives: a receiving thread reads it, or none does (the loop)."""
    assert server.uploads.storage.receivers_busy == (1 if path == "thread" else 0)


async def until_read(request: RawRequest) -> None:
    """Until the server has read every byte sent so far."""
    await wait_until(request.is_read_by_server, what="the server read what was sent")


async def test_a_large_patch_is_stored_exactly_and_its_connection_serves_on(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    server, source, url = await upload_on(make_server, http, path, 3 * MiB + 12345)
    async with raw_patch(url, 0, len(source)) as request:
        await send_on_path(request, source, path, server)
        answer = await request.response()
        assert answer.status == 204, answer
        assert answer.headers["upload-offset"] == str(len(source))
        assert "connection" not in answer.headers  # kept open: the next request follows
        await request.send(f"HEAD {path_of(url)} HTTP/1.1\r\nHost: x\r\n{TUS_LINE}\r\n".encode())
        again = await request.response(has_body=False)
        assert again.status == 200 and again.headers["upload-offset"] == str(len(source))
    assert server.file_of(url).read_bytes() == source
    assert await completed_digest(http, url) == repr_digest_of(source)
    assert server.uploads.storage.receivers_busy == 0


async def test_a_request_pipelined_after_a_large_body_is_answered_too(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    """The parser that did not see the body is replaced: what follows it parses."""
    _server, source, url = await upload_on(make_server, http, path, 2 * MiB)
    async with raw_patch(url, 0, len(source)) as request:
        head = f"HEAD {path_of(url)} HTTP/1.1\r\nHost: x\r\n{TUS_LINE}\r\n".encode()
        await request.send(source + head)
        answer = await request.response()
        then = await request.response(has_body=False)
    assert answer.status == 204, answer
    assert then.status == 200 and then.headers["upload-offset"] == str(len(source))


async def test_a_body_after_expect_100_continue_is_read_the_same_way(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    server, source, url = await upload_on(make_server, http, path, 2 * MiB)
    headers = {**patch_headers(0), "Content-Length": str(len(source)), "Expect": "100-continue"}
    request = await RawRequest.start(url, "PATCH", headers)
    try:
        interim = await request.response(has_body=False)
        assert interim.status == 100
        await send_on_path(request, source, path, server)
        answer = await request.response()
    finally:
        await request.close()
    assert answer.status == 204, answer
    assert server.file_of(url).read_bytes() == source


async def test_a_client_that_hangs_up_mid_body_keeps_every_byte_that_arrived(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    server, source, url = await upload_on(make_server, http, path, 6 * MiB)
    sent = source[: 2 * MiB + 777]
    async with raw_patch(url, 0, len(source)) as request:
        await request.send(sent)
        await until_read(request)

    async def is_over() -> bool:
        return not await server.is_locked(url)

    await wait_until(is_over, what="the hung-up PATCH ended")
    assert await head_offset(http, url) == len(sent)
    assert server.file_of(url).read_bytes() == sent
    rest_of = io.BytesIO(source[len(sent) :])
    async with http.patch(url, data=rest_of, headers=patch_headers(len(sent))) as rest:
        assert rest.status == 204
    assert await completed_digest(http, url) == repr_digest_of(source)


async def test_a_newer_request_takes_the_upload_over_from_a_running_body(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    server, source, url = await upload_on(make_server, http, path, 6 * MiB)
    async with raw_patch(url, 0, len(source)) as running:
        await running.send(source[: 2 * MiB])
        await until_read(running)
        # the newer PATCH asks the running one to stop; it commits what arrived and answers
        async with http.patch(url, data=b"x", headers=patch_headers(0)) as newer:
            assert newer.status == 409  # its offset is behind what the first one committed
            assert newer.headers["Upload-Offset"] == str(2 * MiB)
        answer = await running.response()
    assert answer.status == 400, answer
    assert answer.headers["upload-offset"] == str(2 * MiB)
    assert answer.headers["connection"] == "close"  # the rest of its body never comes
    assert server.file_of(url).read_bytes() == source[: 2 * MiB]


async def test_a_head_during_a_running_body_commits_what_arrived(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    server, source, url = await upload_on(make_server, http, path, 8 * MiB)
    async with raw_patch(url, 0, len(source)) as running:
        await running.send(source[: 5 * MiB])
        await until_read(running)
        offset = await head_offset(http, url)  # the holder commits for the HEAD
        # the loop path writes in blocks of up to 4 MiB: the last one may still be in memory
        assert 5 * MiB - 4 * MiB <= offset <= 5 * MiB
        assert server.file_of(url).read_bytes()[:offset] == source[:offset]
        await running.send(source[5 * MiB :])
        answer = await running.response()
    assert answer.status == 204, answer
    assert await completed_digest(http, url) == repr_digest_of(source)


async def test_a_stalled_body_times_out_with_what_arrived_committed(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    _server, source, url = await upload_on(make_server, http, path, 4 * MiB, idle_timeout_s=0.5)
    async with raw_patch(url, 0, len(source)) as request:
        await request.send(source[: 3 * MiB // 2])
        answer = await request.response()
    assert answer.status == 408, answer
    assert f"{3 * MiB // 2} bytes are committed".encode() in answer.body
    assert await head_offset(http, url) == 3 * MiB // 2


async def test_a_body_that_fails_its_checksum_keeps_nothing(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    server, source, url = await upload_on(make_server, http, path, 2 * MiB)
    wrong = base64.b64encode(hashlib.sha1(source[1:], usedforsecurity=False).digest()).decode()
    headers = {**patch_headers(0), "Upload-Checksum": f"sha1 {wrong}"}
    async with http.patch(url, data=io.BytesIO(source), headers=headers) as response:
        assert response.status == 460
    assert await head_offset(http, url) == 0
    assert server.file_of(url).stat().st_size == 0
    right = base64.b64encode(hashlib.sha1(source, usedforsecurity=False).digest()).decode()
    headers = {**patch_headers(0), "Upload-Checksum": f"sha1 {right}"}
    async with http.patch(url, data=io.BytesIO(source), headers=headers) as response:
        assert response.status == 204
    assert await completed_digest(http, url) == repr_digest_of(source)


async def test_a_graceful_stop_commits_what_arrived_and_answers_503(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    server, source, url = await upload_on(make_server, http, path, 4 * MiB)
    async with raw_patch(url, 0, len(source)) as request:
        await request.send(source[: 3 * MiB // 2])
        await until_read(request)
        server.uploads.stop_writers()
        answer = await request.response()
    assert answer.status == 503, answer
    assert int(answer.headers["retry-after"]) > 0
    assert f"{3 * MiB // 2} bytes are committed".encode() in answer.body
    assert server.file_of(url).read_bytes() == source[: 3 * MiB // 2]
    committed = await server.uploads.state.get(upload_id_of(url), "anonymous")
    assert committed.offset == 3 * MiB // 2


async def test_past_the_receiving_threads_a_large_body_is_read_on_the_loop(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(receive_threads=1, receive_min_bytes=MiB)
    storage = server.uploads.storage
    first, second = os.urandom(3 * MiB), os.urandom(2 * MiB)
    first_url = await create_upload(http, server.url, len(first))
    second_url = await create_upload(http, server.url, len(second))
    async with raw_patch(first_url, 0, len(first)) as holding:
        await holding.send(first[:MiB])
        await until_read(holding)
        assert storage.receivers_busy == 1  # the one thread reads this body
        async with raw_patch(second_url, 0, len(second)) as other:
            await other.send(second)
            answer = await other.response()
        assert answer.status == 204, answer
        assert storage.receivers_busy == 1  # still only the first one's: read on the loop
        await holding.send(first[MiB:])
        first_answer = await holding.response()
    assert first_answer.status == 204
    assert storage.receivers_busy == 0
    assert server.file_of(first_url).read_bytes() == first
    assert server.file_of(second_url).read_bytes() == second


async def test_below_the_threshold_a_body_keeps_its_connection(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    """A body under `receive_min_bytes` is read on the loop, and its connection serves the
    next request."""
    server = await make_server(receive_min_bytes=MiB)
    source = os.urandom(MiB - 1 + 100 * 1024)
    url = await create_upload(http, server.url, len(source))
    request = await RawRequest.patch(url, 0, MiB - 1)
    try:
        await request.send(source[: MiB - 1])
        answer = await request.response()
        assert answer.status == 204 and "connection" not in answer.headers
        rest = source[MiB - 1 :]
        head = (
            f"PATCH {path_of(url)} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
            f"Upload-Offset: {MiB - 1}\r\nContent-Type: application/offset+octet-stream\r\n"
            f"Content-Length: {len(rest)}\r\n\r\n"
        )
        await request.send(head.encode() + rest)  # the same connection, the next request
        again = await request.response()
    finally:
        await request.close()
    assert again.status == 204, again
    assert server.file_of(url).read_bytes() == source


async def test_by_default_bodies_from_16_mib_are_read_in_threads(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """One stream of 8 MiB PATCHes is faster on the loop (benchmarks/README.md)."""
    assert server.settings.receive_min_bytes == 16 * MiB
    source = os.urandom(24 * MiB)
    url = await create_upload(http, server.url, len(source))
    for start, end, busy in ((0, 8 * MiB, 0), (8 * MiB, len(source), 1)):
        async with raw_patch(url, start, end - start) as request:
            await request.send(source[start : end - 1])
            await until_read(request)
            assert server.uploads.storage.receivers_busy == busy
            await request.send(source[end - 1 : end])
            assert (await request.response()).status == 204
    assert await completed_digest(http, url) == repr_digest_of(source)


async def test_a_body_that_would_leave_too_little_disk_is_refused_and_nothing_kept(
    make_server: ServerFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The thread checks --min-free-disk before each 4 MiB it writes: the body is refused
    (507) before the disk goes under the minimum, and what it wrote is removed. A second
    server on the same data takes the PATCH, so the creation meets no minimum; the 32 MiB
    of room leaves the test unmoved by other writers on the disk meanwhile."""
    creating = await make_server(receive_min_bytes=MiB)
    source = os.urandom(64 * MiB)
    url = await create_upload(http, creating.url, len(source))
    stats = os.statvfs(tmp_path)  # the servers' data directory is under it
    free = stats.f_bavail * stats.f_frsize
    server = await make_server(receive_min_bytes=MiB, min_free_disk_bytes=free - 32 * MiB)
    url = server.url + upload_id_of(url)
    async with http.patch(url, data=io.BytesIO(source), headers=patch_headers(0)) as refused:
        assert refused.status == 507
        assert "low on disk space" in await refused.text()
    assert await head_offset(http, url) == 0
    assert server.file_of(url).stat().st_size == 0


async def test_many_large_bodies_at_once_each_get_their_exact_bytes(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    # more bodies than threads: both paths at once
    server = await make_server(receive_threads=4, receive_min_bytes=MiB)
    sources = [os.urandom(MiB + 4096 * index) for index in range(8)]
    urls = [await create_upload(http, server.url, len(source)) for source in sources]

    async def send(url: str, source: bytes) -> int:
        async with http.patch(url, data=io.BytesIO(source), headers=patch_headers(0)) as response:
            return response.status

    statuses = await asyncio.gather(*(send(u, s) for u, s in zip(urls, sources, strict=True)))
    assert statuses == [204] * len(sources)
    for url, source in zip(urls, sources, strict=True):
        assert server.file_of(url).read_bytes() == source
        assert await completed_digest(http, url) == repr_digest_of(source)


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own niceness is Linux's")
def test_the_hashing_threads_run_nicer_than_the_loop_and_the_other_threads(
    tmp_path: Path,
) -> None:
    """Under load the event loop (every HEAD, every small PATCH) gets the CPU before the bulk
    threads (hashing, and writing blocks read on the loop), BULK_NICENESS nicer; the
    receiving threads, their syncs, the short file operations and the bulk work of bodies
    that stream with few others are not."""
    storage = Storage(tmp_path, fsync="always", min_free_disk_bytes=0)

    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    try:
        loops = niceness()
        crowds = storage.bulk_for(few=False)
        assert crowds.submit(niceness).result(30) == min(19, loops + BULK_NICENESS)
        for pool in (storage.receiving, storage.receive_syncs, storage.io):
            assert pool.submit(niceness).result(30) == loops
        assert storage.bulk_for(few=True).submit(niceness).result(30) == loops
        assert niceness() == loops  # the caller's own is left alone
    finally:
        storage.close()


async def test_a_lone_body_is_hashed_at_the_loops_priority(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    """A body streaming with no crowd has its blocks written and hashed by the bulk threads
    at the loop's priority (a pool starts its threads on its first task)."""
    server, source, url = await upload_on(make_server, http, path, 6 * MiB + 4321)
    async with http.patch(url, data=io.BytesIO(source), headers=patch_headers(0)) as response:
        assert response.status == 204
    assert server.uploads.storage.bulk_few._threads
    assert server.file_of(url).read_bytes() == source
    assert await completed_digest(http, url) == repr_digest_of(source)


async def test_a_crowd_of_bodies_is_hashed_by_the_nicer_threads(
    make_server: ServerFactory, http: aiohttp.ClientSession, path: str
) -> None:
    """With more than FEW_BODIES bodies streaming in the process, every block written meanwhile
    goes to the niced bulk threads, so the loop answers small requests first, however large
    --body-memory is; each body still lands exactly."""
    server = await start(make_server, path, body_memory_bytes=256 * MiB)
    crowd = FEW_BODIES + 1
    sources = [os.urandom(6 * MiB + index) for index in range(crowd)]
    urls = [await create_upload(http, server.url, len(source)) for source in sources]
    first_part = 7 * MiB // 2
    async with contextlib.AsyncExitStack() as stack:
        requests = [
            await stack.enter_async_context(raw_patch(url, 0, len(source)))
            for url, source in zip(urls, sources, strict=True)
        ]
        memory = server.uploads.body_memory
        await wait_until(lambda: memory.streaming == crowd, what="every body streaming")
        for request, source in zip(requests, sources, strict=True):
            await request.send(source[:first_part])
        for url in urls:  # a HEAD commits what arrived: written, by whichever threads

            async def written(url: str = url) -> bool:
                return await head_offset(http, url) >= 3 * MiB

            await wait_until(written, what="the first part of each body written")
        assert not server.uploads.storage.bulk_few._threads
        for request, source in zip(requests, sources, strict=True):
            await request.send(source[first_part:])
        answers = [await request.response() for request in requests]
    assert [answer.status for answer in answers] == [204] * crowd
    for url, source in zip(urls, sources, strict=True):
        assert server.file_of(url).read_bytes() == source
        assert await completed_digest(http, url) == repr_digest_of(source)
