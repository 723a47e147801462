"""The SHA-256 of every completed upload (`Repr-Digest: sha-256=:<base64>:`, RFC 9530) equals
hashlib's, whichever way the bytes arrived: in one PATCH, in several, after a refused chunk,
across a server restart, and from two processes taking turns."""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp

from tests.conftest import (
    OFFSET_STREAM,
    TUS,
    Server,
    ServerProcess,
    create_upload,
    head_offset,
    patch_headers,
    wait_until,
)


def repr_digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode('ascii')}:"


async def patch(
    http: aiohttp.ClientSession, url: str, offset: int, data: bytes, **headers: str
) -> None:
    body = io.BytesIO(data)  # aiohttp warns about large raw bytes bodies
    async with http.patch(url, data=body, headers=patch_headers(offset, **headers)) as response:
        assert response.status == 204, await response.text()
        assert response.headers["Upload-Offset"] == str(offset + len(data))


async def new_upload(http: aiohttp.ClientSession, endpoint: str, length: int) -> str:
    async with http.post(endpoint, headers={**TUS, "Upload-Length": str(length)}) as response:
        assert response.status == 201, await response.text()
        return response.headers["Location"]


async def digest_on_head(http: aiohttp.ClientSession, url: str) -> str | None:
    async with http.head(url, headers=TUS) as response:
        assert response.status == 200
        return response.headers.get("Repr-Digest")


async def wait_for_digest(http: aiohttp.ClientSession, url: str) -> str:
    """Poll HEAD until the upload is hashed (a process that did not see every byte hashes the
    file in the background); the Repr-Digest."""
    found: list[str] = []

    async def has_digest() -> bool:
        digest = await digest_on_head(http, url)
        found.extend([digest] if digest else [])
        return bool(digest)

    await wait_until(has_digest)
    return found[-1]


async def assert_digests(http: aiohttp.ClientSession, url: str, data: bytes) -> None:
    """HEAD and GET both carry hashlib's SHA-256 of `data`, and GET serves `data`."""
    assert await wait_for_digest(http, url) == repr_digest(data)
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Repr-Digest"] == repr_digest(data)
        assert await response.read() == data


async def test_digest_of_an_upload_sent_in_one_patch(
    server: Server, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(100_000)
    url = await create_upload(http, server, len(data))
    assert await digest_on_head(http, url) is None
    await patch(http, url, 0, data)
    assert await digest_on_head(http, url) == repr_digest(data)  # hashed as it arrived
    await assert_digests(http, url, data)


async def test_digest_of_an_upload_sent_in_several_patches_and_a_refused_one(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """A chunk refused with 460 went through the running hash; it must not count."""
    data = os.urandom(30_000)
    url = await create_upload(http, server, len(data))
    await patch(http, url, 0, data[:10_000])
    chunk = data[10_000:20_000]
    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    async with http.patch(
        url, data=chunk, headers=patch_headers(10_000, **{"Upload-Checksum": f"sha256 {wrong}"})
    ) as response:
        assert response.status == 460
    await patch(http, url, 10_000, chunk)
    await patch(http, url, 20_000, data[20_000:])
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
    url = await create_upload(http, server, 0)
    await assert_digests(http, url, b"")


async def test_digest_after_a_resume_across_a_server_restart(
    processes: Callable[..., ServerProcess], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data = os.urandom(3 * 2**20 + 17)
    half = len(data) // 2
    data_dir = tmp_path / "data"
    first = processes(data_dir)
    url = await new_upload(http, first.url, len(data))
    upload_id = url.rsplit("/", 1)[1]
    await patch(http, url, 0, data[:half])
    assert first.stop() == 0  # SIGTERM: a clean stop

    second = processes(data_dir)
    url = second.url + upload_id
    assert await head_offset(http, url) == half
    await patch(http, url, half, data[half:])
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
    upload_id = (await new_upload(http, servers[0].url, len(data))).rsplit("/", 1)[1]
    for part, (start, end) in enumerate(itertools.pairwise(bounds)):
        url = servers[part % 2].url + upload_id
        assert await head_offset(http, url) == start
        await patch(http, url, start, data[start:end])
    for server in servers:
        await assert_digests(http, server.url + upload_id, data)
