from __future__ import annotations

import aiohttp

from tests.support.servers import Server
from tests.support.tus import create_upload, head_offset, patch_headers


async def test_create_patch_head_round_trip(server: Server, http: aiohttp.ClientSession) -> None:
    url = await create_upload(http, server.url, 6)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
        assert response.headers["Upload-Offset"] == "3"
    assert await head_offset(http, url) == 3
    assert server.file_of(url).read_bytes() == b"abc"
