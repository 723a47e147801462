"""Creation with a small upload body: read whole, then stored with the new upload in one step.

Bodies up to `SMALL_BODY_BYTES` skip the streaming path (uploads.Uploads.create_with_body).
These tests hold that path to the same promises as the streaming one: the exact bytes, the
SHA-256, the events, and what is kept when the body stops early or is refused.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

import aiohttp
import pytest

from tests.support.events import event_types
from tests.support.faults import sigterm_mid_small_body
from tests.support.files import file_of
from tests.support.processes import StartProcess, on, start_server
from tests.support.raw_http import RawRequest
from tests.support.servers import Server, ServerFactory
from tests.support.tus import (
    OFFSET_STREAM,
    TUS,
    completed_digest,
    patch_headers,
    repr_digest_of,
    upload_id_of,
)
from tests.support.waiting import wait_until
from tusserver.uploads.body import SMALL_BODY_BYTES


def creation_headers(length: int | None, body_bytes: int, **extra: str) -> dict[str, str]:
    sized = {"Upload-Length": str(length)} if length is not None else {"Upload-Defer-Length": "1"}
    return {**TUS, **sized, "Content-Type": OFFSET_STREAM, "Content-Length": str(body_bytes),
            **extra}  # fmt: skip


async def listed(http: aiohttp.ClientSession, server: Server) -> list[dict[str, Any]]:
    async with http.get(server.url) as response:
        assert response.status == 200
        uploads: list[dict[str, Any]] = (await response.json())["uploads"]
        return uploads


async def created_by_hang_up(
    http: aiohttp.ClientSession, server: Server, headers: dict[str, str], sent: bytes
) -> dict[str, Any]:
    """POST `headers` and the `sent` part of the body, then hang up; the one upload the
    server then lists (it is stored in one step, at the offset it keeps)."""
    request = await RawRequest.start(server.url, "POST", headers)
    await request.send(sent)
    await request.close()

    async def one_upload_listed() -> bool:
        return len(await listed(http, server)) == 1

    await wait_until(one_upload_listed)
    (upload,) = await listed(http, server)
    return upload


async def test_a_whole_small_upload_is_completed_with_its_digest_and_both_events(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    source = os.urandom(SMALL_BODY_BYTES)
    headers = creation_headers(len(source), len(source))
    async with http.post(server.url, data=source, headers=headers) as response:
        assert response.status == 201
        assert response.headers["Upload-Offset"] == str(len(source))
        url = response.headers["Location"]
    assert server.file_of(url).read_bytes() == source
    assert server.file_of(url).stat().st_mode & 0o777 == 0o600
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)
        assert "Upload-Expires" not in response.headers  # complete: no longer expires
    upload_id = upload_id_of(url)
    assert await event_types(flushed_redis, upload_id) == ["created", "completed"]
    async with http.get(url) as response:
        assert await response.read() == source


async def test_a_small_first_part_then_patches_give_the_digest_of_every_byte(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    source = os.urandom(3000)
    headers = creation_headers(None, 1000)  # deferred length: the last PATCH declares it
    async with http.post(server.url, data=source[:1000], headers=headers) as response:
        assert response.status == 201
        assert response.headers["Upload-Offset"] == "1000"
        url = response.headers["Location"]
    upload_id = upload_id_of(url)
    assert await event_types(flushed_redis, upload_id) == ["created"]
    declared = patch_headers(1000, **{"Upload-Length": str(len(source))})
    async with http.patch(url, data=source[1000:], headers=declared) as response:
        assert response.status == 204
        assert response.headers["Upload-Offset"] == str(len(source))
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)
    assert server.file_of(url).read_bytes() == source
    assert await event_types(flushed_redis, upload_id) == ["created", "completed"]


async def test_a_small_body_with_the_right_checksum_is_kept(
    server: Server, http: aiohttp.ClientSession
) -> None:
    body = b"small and checked"
    checksum = "sha1 " + base64.b64encode(hashlib.sha1(body).digest()).decode()  # noqa: S324
    headers = creation_headers(100, len(body), **{"Upload-Checksum": checksum})
    async with http.post(server.url, data=body, headers=headers) as response:
        assert response.status == 201
        assert response.headers["Upload-Offset"] == str(len(body))
        url = response.headers["Location"]
    assert server.file_of(url).read_bytes() == body


async def test_a_small_body_with_a_wrong_checksum_is_460_and_keeps_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    body = b"small and damaged"
    checksum = "sha256 " + base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    headers = creation_headers(len(body), len(body), **{"Upload-Checksum": checksum})
    async with http.post(server.url, data=body, headers=headers) as response:
        assert response.status == 460
        assert "checksum" in (await response.text()).lower()
        url = response.headers["Location"]  # the upload exists: the client may resume it
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Upload-Offset"] == "0"
        assert "Repr-Digest" not in response.headers
    assert server.file_of(url).read_bytes() == b""


async def test_a_hang_up_mid_body_keeps_the_bytes_that_arrived(
    server: Server, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(10_000)
    headers = creation_headers(len(source), 10_000)
    upload = await created_by_hang_up(http, server, headers, source[:4000])
    assert upload["offset"] == 4000
    assert upload["state"] == "uploading"
    url = upload["url"]
    assert server.file_of(url).read_bytes() == source[:4000]
    async with http.patch(url, data=source[4000:], headers=patch_headers(4000)) as response:
        assert response.status == 204
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == repr_digest_of(source)


async def test_a_checksummed_body_that_ends_early_keeps_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(5000)
    checksum = "md5 " + base64.b64encode(hashlib.md5(source).digest()).decode()  # noqa: S324
    headers = creation_headers(len(source), len(source), **{"Upload-Checksum": checksum})
    upload = await created_by_hang_up(http, server, headers, source[:2000])
    assert upload["offset"] == 0
    assert server.file_of(upload["url"]).read_bytes() == b""


async def test_a_stalled_small_body_is_408_with_its_location_and_keeps_what_arrived(
    make_server: ServerFactory,
) -> None:
    server = await make_server(idle_timeout_s=0.3)
    source = os.urandom(2000)
    request = await RawRequest.start(server.url, "POST", creation_headers(len(source), 2000))
    try:
        await request.send(source[:700])
        answer = await request.response()
    finally:
        await request.close()
    assert answer.status == 408
    assert b"700 bytes are committed" in answer.body
    assert server.file_of(answer.headers["location"]).read_bytes() == source[:700]


async def test_sigterm_during_a_small_body_answers_503_with_its_location_and_keeps_it(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
) -> None:
    """A graceful stop wakes a small creation waiting for the rest of its body, as it wakes
    a streaming PATCH: what arrived is kept and the client learns where to resume, instead
    of the stop waiting out its timeout and cancelling the request with nothing kept."""
    data_dir = tmp_path_factory.mktemp("small-term") / "data"
    server = await start_server(processes, data_dir)
    source = os.urandom(10_000)
    headers = creation_headers(len(source), len(source))
    answer, kept = await sigterm_mid_small_body(server, server.url, "POST", headers, source[:3000])
    assert kept == 3000  # every byte the server had read

    server = await start_server(processes, data_dir)
    url = on(server, answer.headers["location"])
    assert file_of(data_dir, url).read_bytes() == source[:kept]
    async with http.head(url, headers=TUS) as response:
        assert int(response.headers["Upload-Offset"]) == kept
    async with http.patch(url, data=source[kept:], headers=patch_headers(kept)) as response:
        assert response.status == 204
    # resumed on a new process: without the first bytes' running hash, it is hashed beside
    assert await completed_digest(http, url) == repr_digest_of(source)


async def test_a_small_body_on_a_disk_below_the_minimum_is_507_and_leaves_nothing(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(min_free_disk_bytes=2**60)
    headers = creation_headers(5, 5)
    async with http.post(server.url, data=b"hello", headers=headers) as response:
        assert response.status == 507
        assert "Location" not in response.headers
    assert await listed(http, server) == []
    uploads_dir = server.settings.data_dir / "uploads"
    assert [path for path in uploads_dir.rglob("*") if path.is_file()] == []


async def test_a_body_just_over_the_small_size_streams_to_the_same_result(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    source = os.urandom(SMALL_BODY_BYTES + 1)
    headers = creation_headers(len(source), len(source))
    async with http.post(server.url, data=source, headers=headers) as response:
        assert response.status == 201
        url = response.headers["Location"]
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Upload-Offset"] == str(len(source))
        assert response.headers["Repr-Digest"] == repr_digest_of(source)
    assert server.file_of(url).read_bytes() == source
    upload_id = upload_id_of(url)
    assert await event_types(flushed_redis, upload_id) == ["created", "completed"]
