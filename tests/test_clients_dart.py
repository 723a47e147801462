"""The Dart/Flutter tus clients, replayed (jjmutumi/tus_client lib/src/client.dart, which
tus_client_dart and another_tus_client derive from): POST with `Upload-Metadata` and
`Upload-Length`; HEAD for the offset (any non-2xx throws a ProtocolException); PATCHes of
fixed chunks (`maxChunkSize = 512 * 1024`; 256 KiB in some forks) with a Content-Length;
each answer's `Upload-Offset` must equal the offset after the chunk, else it throws. A
stored URL is resumed after a restart (`resume()` reads the store, then HEAD).
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.support.tus import TUS, completed_digest, head, head_offset, patch, repr_digest_of

DATA = bytes(range(256)) * 4500  # 1.1 MiB


async def create(http: aiohttp.ClientSession, endpoint: str) -> str:
    headers = {**TUS, "Upload-Metadata": "filename dmlkZW8ubXA0", "Upload-Length": str(len(DATA))}
    async with http.post(endpoint, headers=headers) as response:
        assert response.status == 201
        return response.headers["Location"]


async def upload(http: aiohttp.ClientSession, url: str, chunk: int, stop_at: int) -> int:
    offset = await head_offset(http, url)
    while offset < min(stop_at, len(DATA)):
        piece = DATA[offset : offset + chunk]
        answer = await patch(http, url, offset, piece)
        assert answer.status == 204
        offset += len(piece)
        assert int(answer.headers["Upload-Offset"]) == offset  # else ProtocolException
    return offset


@pytest.mark.parametrize("chunk", [256 * 1024, 512 * 1024])
async def test_fixed_chunks_pause_and_resume_from_the_stored_url(
    endpoint: str, http: aiohttp.ClientSession, chunk: int
) -> None:
    url = await create(http, endpoint)
    assert await upload(http, url, chunk, 2 * chunk) == 2 * chunk  # paused, app killed
    assert await upload(http, url, chunk, len(DATA)) == len(DATA)  # resumed from the store
    assert await completed_digest(http, url) == repr_digest_of(DATA)


async def test_wrong_offset_is_409_with_the_servers_offset(
    endpoint: str, http: aiohttp.ClientSession
) -> None:
    url = await create(http, endpoint)
    answer = await patch(http, url, 100, DATA[:1000])
    assert (answer.status, answer.headers["Upload-Offset"]) == (409, "0")
    assert await head_offset(http, url) == 0


async def test_gone_upload_is_404_on_head(endpoint: str, http: aiohttp.ClientSession) -> None:
    """The client throws on any non-2xx HEAD; the app clears its store and starts over."""
    url = await create(http, endpoint)
    async with http.delete(url, headers=TUS) as response:
        assert response.status == 204
    assert (await head(http, url)).status == 404
