"""TUSKit (iOS), replayed (tus/TUSKit Sources/TUSKit/TUSAPI.swift, TUSClient.swift,
Tasks/CreationTask.swift, Tasks/StatusTask.swift, Tasks/UploadDataTask.swift):

- `serverInfo`: OPTIONS must answer exactly 200 or 204.
- `create`: POST with `Upload-Length` and `Upload-Metadata` (filename, filetype).
- chunks of 500 KiB (`chunkSize: Int = 500 * 1024`), each a PATCH upload task from a file
  with its Content-Length; on iOS 17+ URLSession adds `Upload-Draft-Interop-Version` and
  `Upload-Complete` to upload tasks itself, so a tus PATCH carries the draft's fields too.
- after a relaunch, `StatusTask`: HEAD must carry both `Upload-Length` (equal to the file's
  size) and `Upload-Offset`; the next chunk starts at that offset.
- any failure (whatever the status) is retried twice with the same task, then reported as
  failed (`retryCount = 2`): a gone upload fails, 404 or 410 alike, and the app starts over.
"""

from __future__ import annotations

import aiohttp

from tests.support.raw_http import RawRequest
from tests.support.tus import TUS, completed_digest, patch, patch_headers, repr_digest_of
from tests.support.waiting import wait_until

CHUNK = 500 * 1024
DATA = bytes(range(256)) * 5000  # 1.22 MiB: three chunks, the last one short
URLSESSION_DRAFT = {"Upload-Draft-Interop-Version": "6", "Upload-Complete": "?0"}


async def create(http: aiohttp.ClientSession, endpoint: str) -> str:
    headers = {**TUS, "Upload-Length": str(len(DATA)),
               "Upload-Metadata": "filename aW1nLmhlaWM=,filetype aW1hZ2UvaGVpYw=="}  # fmt: skip
    async with http.post(endpoint, headers=headers) as response:
        assert response.status == 201
        return response.headers["Location"]


async def status(http: aiohttp.ClientSession, url: str) -> int:
    """StatusTask: both headers, and the length must equal the file's size."""
    async with http.head(url, headers=TUS) as response:
        assert response.status == 200
        assert int(response.headers["Upload-Length"]) == len(DATA)
        return int(response.headers["Upload-Offset"])


async def send_chunks(http: aiohttp.ClientSession, url: str, offset: int, count: int) -> int:
    for _ in range(count):
        piece = DATA[offset : offset + CHUNK]
        answer = await patch(http, url, offset, piece, **URLSESSION_DRAFT)
        assert answer.status == 204  # tus 1.0.0, never a draft 104 or 2xx of the draft
        assert answer.headers["Tus-Resumable"] == "1.0.0"
        assert "Upload-Draft-Interop-Version" not in answer.headers
        offset = int(answer.headers["Upload-Offset"])
        if offset == len(DATA):
            break
    return offset


async def test_options_create_chunks_relaunch_and_resume(
    endpoint: str, http: aiohttp.ClientSession
) -> None:
    async with http.options(endpoint) as response:
        assert response.status in (200, 204)
        assert "creation" in response.headers["Tus-Extension"].split(",")
    url = await create(http, endpoint)
    assert await send_chunks(http, url, 0, 1) == CHUNK
    # the app is killed mid second chunk: the upload task's body stops after 100 bytes
    headers = patch_headers(CHUNK, **URLSESSION_DRAFT, **{"Content-Length": str(CHUNK)})
    killed = await RawRequest.start(url, "PATCH", headers)
    await killed.send(DATA[CHUNK : CHUNK + 100])
    await wait_until(killed.is_read_by_server, what="the server read the 100 bytes")
    await killed.close()
    offset = await status(http, url)  # relaunch: StatusTask
    assert CHUNK <= offset <= CHUNK + 100
    assert await send_chunks(http, url, offset, 10) == len(DATA)
    assert await status(http, url) == len(DATA)
    assert await completed_digest(http, url) == repr_digest_of(DATA)


async def test_gone_upload_fails_the_status_task_and_the_app_starts_over(
    endpoint: str, http: aiohttp.ClientSession
) -> None:
    url = await create(http, endpoint)
    async with http.delete(url, headers=TUS) as response:
        assert response.status == 204
    for _ in range(3):  # the first try and retryCount = 2 retries, all refused
        async with http.head(url, headers=TUS) as response:
            assert response.status == 404
            assert "Upload-Offset" not in response.headers
    fresh = await create(http, endpoint)  # uploadFailed: the app uploads the file again
    assert await send_chunks(http, fresh, 0, 10) == len(DATA)
