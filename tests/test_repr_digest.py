"""The SHA-256 of every completed upload (`Repr-Digest: sha-256=:<base64>:`, RFC 9530) equals
hashlib's, whichever way the bytes arrived: in one PATCH, in several, after a refused chunk,
across a server restart, and from two processes taking turns."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.support.processes import ServerProcess
from tests.support.servers import Server
from tests.support.tus import (
    OFFSET_STREAM,
    TUS,
    completed_digest,
    create_upload,
    head_offset,
    patch,
    patch_headers,
    repr_digest_of,
    upload_id_of,
)


async def patch_accepted(
    http: aiohttp.ClientSession, url: str, offset: int, data: bytes, **headers: str
) -> None:
    """PATCH `data` at `offset`; the server must take all of it."""
    response = await patch(http, url, offset, data, **headers)
    assert response.status == 204, await response.text()
    assert response.headers["Upload-Offset"] == str(offset + len(data))


async def digest_on_head(http: aiohttp.ClientSession, url: str) -> str | None:
    async with http.head(url, headers=TUS) as response:
        assert response.status == 200
        return response.headers.get("Repr-Digest")


async def assert_digests(http: aiohttp.ClientSession, url: str, data: bytes) -> None:
    """HEAD and GET both carry hashlib's SHA-256 of `data`, and GET serves `data`."""
    assert await completed_digest(http, url) == repr_digest_of(data)
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Repr-Digest"] == repr_digest_of(data)
        assert await response.read() == data


async def test_digest_of_an_upload_sent_in_one_patch(
    server: Server, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(100_000)
    url = await create_upload(http, server.url, len(data))
    assert await digest_on_head(http, url) is None
    await patch_accepted(http, url, 0, data)
    assert await digest_on_head(http, url) == repr_digest_of(data)  # hashed as it arrived
    await assert_digests(http, url, data)


async def test_digest_of_an_upload_sent_in_several_patches_and_a_refused_one(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """A chunk refused with 460 went through the running hash; it must not count."""
    data = os.urandom(30_000)
    url = await create_upload(http, server.url, len(data))
    await patch_accepted(http, url, 0, data[:10_000])
    chunk = data[10_000:20_000]
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    async with http.patch(
        url, data=chunk, headers=patch_headers(10_000, **{"Upload-Checksum": f"sha256 {wrong}"})
    ) as response:
        assert response.status == 460
    await patch_accepted(http, url, 10_000, chunk)
    await patch_accepted(http, url, 20_000, data[20_000:])
    await assert_digests(http, url, data)


async def test_digest_of_an_upload_created_with_its_body(
    server: Server, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(5000)
    headers = {**TUS, "Upload-Length": str(len(data)), "Content-Type": OFFSET_STREAM}
    async with http.post(server.url, data=data, headers=headers) as response:
        assert response.status == 201
        url = response.headers["Location"]
    await assert_digests(http, url, data)


async def test_digest_of_an_empty_upload(server: Server, http: aiohttp.ClientSession) -> None:
    url = await create_upload(http, server.url, 0)
    await assert_digests(http, url, b"")


async def test_digest_after_a_resume_across_a_server_restart(
    processes: Callable[..., ServerProcess], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(3 * 2**20 + 17)
    half = len(data) // 2
    data_dir = tmp_path / "data"
    first = processes(data_dir)
    url = await create_upload(http, first.url, len(data))
    upload_id = upload_id_of(url)
    await patch_accepted(http, url, 0, data[:half])
    assert first.stop() == 0  # SIGTERM: a clean stop

    second = processes(data_dir)
    url = second.url + upload_id
    assert await head_offset(http, url) == half
    await patch_accepted(http, url, half, data[half:])
    await assert_digests(http, url, data)


async def test_digest_after_patches_alternating_between_two_processes(
    processes: Callable[..., ServerProcess],
    redis_url: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    data = os.urandom(2 * 2**20 + 3)
    bounds = [0, 100_000, 1_000_000, 1_000_001, len(data)]
    data_dir = tmp_path / "shared"
    servers = [processes(data_dir, "--redis-url", redis_url) for _ in range(2)]
    upload_id = upload_id_of(await create_upload(http, servers[0].url, len(data)))
    for part, (start, end) in enumerate(itertools.pairwise(bounds)):
        url = servers[part % 2].url + upload_id
        assert await head_offset(http, url) == start
        await patch_accepted(http, url, start, data[start:end])
    for server in servers:
        await assert_digests(http, server.url + upload_id, data)
