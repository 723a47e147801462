"""A small PATCH (a known size of at most `SMALL_BODY_BYTES`): read whole under the lock, then
the file opened, written, hashed, made durable and closed in one thread hop
(`AppendSession.append_small`). These tests hold it to the streaming PATCH's promises: the
exact bytes and SHA-256, what a stop keeps, and a file that disagrees with its offset.
"""

from __future__ import annotations

import base64
import hashlib
import os

import aiohttp
import pytest

from tests.support.faults import sigterm_mid_small_body
from tests.support.files import file_of
from tests.support.processes import StartProcess, on, start_server
from tests.support.raw_http import RawRequest
from tests.support.servers import Server, ServerFactory
from tests.support.tus import (
    TUS,
    completed_digest,
    create_upload,
    head_offset,
    patch,
    patch_headers,
    repr_digest_of,
)
from tests.support.waiting import wait_until
from tusserver.uploads.body import SMALL_BODY_BYTES


async def stopped_patch(url: str, offset: int, sent: bytes, size: int) -> None:
    """A PATCH of `size` bytes that sends `sent`, then hangs up."""
    request = await RawRequest.patch(url, offset, size)
    await request.send(sent)
    await request.close()


async def test_small_patches_give_every_byte_and_the_digest(
    server: Server, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(3 * SMALL_BODY_BYTES)
    url = await create_upload(http, server.url, len(source))
    for offset in range(0, len(source), SMALL_BODY_BYTES):
        answer = await patch(http, url, offset, source[offset : offset + SMALL_BODY_BYTES])
        assert answer.status == 204
        assert answer.headers["Upload-Offset"] == str(offset + SMALL_BODY_BYTES)
    assert server.file_of(url).read_bytes() == source
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)


async def test_a_hang_up_mid_small_patch_keeps_what_arrived(
    server: Server, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(10_000)
    url = await create_upload(http, server.url, len(source))
    await stopped_patch(url, 0, source[:4000], 10_000)

    async def kept() -> bool:  # the lock is let go once the bytes are committed
        return await head_offset(http, url) == 4000

    await wait_until(kept)
    assert server.file_of(url).read_bytes() == source[:4000]
    assert (await patch(http, url, 4000, source[4000:])).status == 204
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)


async def test_a_stalled_small_patch_is_408_and_keeps_what_arrived(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(idle_timeout_s=0.3)
    source = os.urandom(2000)
    url = await create_upload(http, server.url, len(source))
    request = await RawRequest.patch(url, 0, 2000)
    try:
        await request.send(source[:700])
        answer = await request.response()
    finally:
        await request.close()
    assert answer.status == 408
    assert b"700 bytes are committed" in answer.body
    assert await head_offset(http, url) == 700
    assert server.file_of(url).read_bytes() == source[:700]


async def test_a_small_patch_with_a_wrong_checksum_is_460_and_keeps_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(6000)
    url = await create_upload(http, server.url, len(source))
    assert (await patch(http, url, 0, source[:1000])).status == 204
    wrong = "sha1 " + base64.b64encode(hashlib.sha1(b"other").digest()).decode()  # noqa: S324
    answer = await patch(http, url, 1000, source[1000:], **{"Upload-Checksum": wrong})
    assert answer.status == 460
    assert await head_offset(http, url) == 1000
    assert server.file_of(url).read_bytes() == source[:1000]
    right = "sha1 " + base64.b64encode(hashlib.sha1(source[1000:]).digest()).decode()  # noqa: S324
    answer = await patch(http, url, 1000, source[1000:], **{"Upload-Checksum": right})
    assert answer.status == 204
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)


async def test_a_checksummed_small_patch_that_ends_early_keeps_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(5000)
    url = await create_upload(http, server.url, len(source))
    checksum = "md5 " + base64.b64encode(hashlib.md5(source).digest()).decode()  # noqa: S324
    request = await RawRequest.start(
        url, "PATCH", {**patch_headers(0), "Content-Length": "5000", "Upload-Checksum": checksum}
    )
    await request.send(source[:2000])
    await request.close()

    async def let_go() -> bool:  # a new PATCH gets the lock at once when the old one is done
        return (await patch(http, url, 0, source[:10])).status == 204

    await wait_until(let_go)
    assert server.file_of(url).read_bytes() == source[:10]  # nothing of the stopped body


async def test_a_file_shorter_than_its_offset_moves_the_offset_back_with_409(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """Bytes lost with the page cache (a crash under --fsync never): the small PATCH finds
    the file shorter than the committed offset, moves the offset back to what the file
    holds and answers 409 with it; resuming from there completes with the right SHA-256."""
    source = os.urandom(12_000)
    url = await create_upload(http, server.url, len(source))
    assert (await patch(http, url, 0, source[:5000])).status == 204
    path = server.file_of(url)
    with path.open("r+b") as file:
        file.truncate(3000)
    answer = await patch(http, url, 5000, source[5000:8000])
    assert answer.status == 409
    assert answer.headers["Upload-Offset"] == "3000"
    assert path.read_bytes() == source[:3000]
    assert await head_offset(http, url) == 3000
    assert (await patch(http, url, 3000, source[3000:])).status == 204
    assert await completed_digest(http, url) == repr_digest_of(source)


async def test_bytes_past_the_committed_offset_are_cut_before_a_small_patch(
    server: Server, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(10_000)
    url = await create_upload(http, server.url, len(source))
    assert (await patch(http, url, 0, source[:5000])).status == 204
    path = server.file_of(url)
    with path.open("ab") as file:
        file.write(b"uncommitted bytes of a crashed request")
    assert (await patch(http, url, 5000, source[5000:])).status == 204
    assert path.read_bytes() == source
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)


async def test_a_small_patch_on_a_disk_below_the_minimum_is_507_and_keeps_the_upload(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    roomy = await make_server()
    source = os.urandom(8000)
    url = await create_upload(http, roomy.url, len(source))
    assert (await patch(http, url, 0, source[:3000])).status == 204
    full = await make_server(min_free_disk_bytes=2**60)  # the same data dir and Redis
    url_on_full = full.url + url.rsplit("/", 1)[1]
    assert (await patch(http, url_on_full, 3000, source[3000:])).status == 507
    assert await head_offset(http, url) == 3000
    assert roomy.file_of(url).read_bytes() == source[:3000]
    assert (await patch(http, url, 3000, source[3000:])).status == 204
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)


async def test_a_new_request_takes_over_a_stalled_small_patch_which_keeps_what_arrived(
    server: Server, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(10_000)
    url = await create_upload(http, server.url, len(source))
    stalled = await RawRequest.patch(url, 0, 10_000)
    try:
        await stalled.send(source[:4000])

        async def held() -> bool:  # the stalled PATCH holds the lock
            return (await patch(http, url, 0, b"x")).status in (409, 423)

        await wait_until(held)
        answer = await stalled.response()
    finally:
        await stalled.close()
    assert answer.status == 400
    assert b"interrupted" in answer.body
    assert await head_offset(http, url) == 4000
    assert server.file_of(url).read_bytes() == source[:4000]
    assert (await patch(http, url, 4000, source[4000:])).status == 204
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)


async def test_sigterm_during_a_small_patch_answers_503_and_keeps_what_arrived(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
) -> None:
    data_dir = tmp_path_factory.mktemp("small-patch-term") / "data"
    server = await start_server(processes, data_dir)
    source = os.urandom(10_000)
    url = await create_upload(http, server.url, len(source))
    headers = {**patch_headers(0), "Content-Length": "10000"}
    _answer, kept = await sigterm_mid_small_body(server, url, "PATCH", headers, source[:3000])
    assert kept == 3000  # every byte the server had read

    server = await start_server(processes, data_dir)
    url = on(server, url)
    assert await head_offset(http, url) == kept
    assert file_of(data_dir, url).read_bytes() == source[:kept]
    assert (await patch(http, url, kept, source[kept:])).status == 204  # no stale lock
    assert await completed_digest(http, url) == repr_digest_of(source)


async def test_a_body_over_the_small_size_streams_to_the_same_bytes(
    server: Server, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(2 * SMALL_BODY_BYTES + 1)
    url = await create_upload(http, server.url, len(source))
    sizes = [SMALL_BODY_BYTES, SMALL_BODY_BYTES + 1]  # one small, one streamed
    offset = 0
    for size in sizes:
        answer = await patch(http, url, offset, source[offset : offset + size])
        assert answer.status == 204
        offset += size
    assert server.file_of(url).read_bytes() == source
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)
