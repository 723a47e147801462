"""The load: the few tus requests the scenarios send, with aiohttp, and one form upload (a
multipart/form-data POST, as `curl -F file=@big` sends it).

Bodies stream from a generator that hands out one reused block of random bytes, so the
client allocates nothing per MiB and does not limit the server. Every body carries its
Content-Length (no chunked encoding), as tus clients send it. Each request checks its status
and raises `LoadError` with the server's answer otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from yarl import URL

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_STREAM = "application/offset+octet-stream"
BLOCK = os.urandom(2**20)
FORM_BOUNDARY = "------------------------" + os.urandom(8).hex()  # curl's shape
# What tus-js-client and Uppy send with every creation; tuspyserver's HEAD answers 400
# without a filename and a filetype.
METADATA = ",".join(
    f"{key} {base64.b64encode(value.encode()).decode()}"
    for key, value in (("filename", "bench.bin"), ("filetype", "application/octet-stream"))
)


class LoadError(Exception):
    """A server answered a request of the load with something unexpected; `status` is the
    HTTP status it answered (None when the answer itself was wrong)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Progress:
    """Bytes handed to the client's socket so far, across all requests."""

    sent_bytes: int = 0


def session(connections: int = 0) -> aiohttp.ClientSession:
    """A client session with no connection limit (0) or `connections` at most, and no total
    timeout: a scenario bounds its own time."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=300),
        auto_decompress=False,
    )


async def body(size: int, progress: Progress) -> AsyncIterator[bytes]:
    """`size` bytes, one reused block at a time."""
    remaining = size
    while remaining > 0:
        block = BLOCK if remaining >= len(BLOCK) else BLOCK[:remaining]
        remaining -= len(block)
        progress.sent_bytes += len(block)
        yield block


async def paced_body(
    size: int, bytes_per_s: int, progress: Progress, interval_s: float = 1.0
) -> AsyncIterator[bytes]:
    """`size` bytes at `bytes_per_s`: a piece every `interval_s` on a fixed schedule (no
    drift when the loop is late), as a slow network delivers a long body."""
    piece = BLOCK[: max(1, round(bytes_per_s * interval_s))]
    started = time.monotonic()
    remaining, sent_pieces = size, 0
    while remaining > 0:
        block = piece if remaining >= len(piece) else piece[:remaining]
        remaining -= len(block)
        progress.sent_bytes += len(block)
        yield block
        sent_pieces += 1
        if remaining > 0:
            await asyncio.sleep(max(0.0, started + sent_pieces * interval_s - time.monotonic()))


def failure_kind(error: BaseException) -> str:
    """What a failed request got: `PATCH 503`, `ServerDisconnectedError`, `TimeoutError`."""
    if isinstance(error, LoadError) and error.status is not None:
        return str(error).split(":", 1)[0] + f" {error.status}"
    return type(error).__name__


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (thousands of
    connections need as many descriptors); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _body_headers(size: int) -> dict[str, str]:
    return {"Content-Type": OFFSET_STREAM, "Content-Length": str(size)}


async def _fail(response: aiohttp.ClientResponse, what: str) -> LoadError:
    text = (await response.text(errors="replace"))[:300]
    return LoadError(f"{what}: {response.status} {text!r}", response.status)


async def create(
    client: aiohttp.ClientSession,
    endpoint: str,
    length: int,
    progress: Progress,
    with_body: bool = False,
) -> tuple[str, int]:
    """POST a new upload of `length` bytes (with all of them as its body when `with_body`:
    creation-with-upload); its absolute URL and offset."""
    headers = {**TUS, "Upload-Length": str(length), "Upload-Metadata": METADATA}
    data = None
    if with_body:
        headers.update(_body_headers(length))
        data = body(length, progress)
    async with client.post(endpoint, headers=headers, data=data) as response:
        if response.status != 201:
            raise await _fail(response, "POST")
        location = str(URL(endpoint).join(URL(response.headers["Location"])))
        return location, int(response.headers.get("Upload-Offset", "0"))


async def patch(
    client: aiohttp.ClientSession,
    url: str,
    offset: int,
    size: int,
    progress: Progress,
    data: AsyncIterator[bytes] | None = None,
) -> int:
    """PATCH `size` bytes at `offset` (from `data`, by default `body`); the new offset
    (checked to be offset + size)."""
    headers = {**TUS, "Upload-Offset": str(offset), **_body_headers(size)}
    data = body(size, progress) if data is None else data
    async with client.patch(url, headers=headers, data=data) as response:
        if response.status != 204:
            raise await _fail(response, "PATCH")
        new_offset = int(response.headers["Upload-Offset"])
    if new_offset != offset + size:
        raise LoadError(f"PATCH: offset {new_offset}, expected {offset + size}")
    return new_offset


async def head(client: aiohttp.ClientSession, url: str) -> int:
    """The upload's offset, as HEAD answers it."""
    async with client.head(url, headers=TUS) as response:
        if response.status != 200:
            raise await _fail(response, "HEAD")
        return int(response.headers["Upload-Offset"])


async def delete(client: aiohttp.ClientSession, url: str) -> None:
    """End an upload and delete its file (the tus termination extension)."""
    async with client.delete(url, headers=TUS) as response:
        if response.status != 204:
            raise await _fail(response, "DELETE")


async def upload(
    client: aiohttp.ClientSession,
    endpoint: str,
    length: int,
    progress: Progress,
    patch_bytes: int | None = None,
) -> str:
    """One whole upload: POST, then PATCHes of `patch_bytes` (all in one when None)."""
    url, offset = await create(client, endpoint, length, progress)
    step = patch_bytes or length
    while offset < length:
        offset = await patch(client, url, offset, min(step, length - offset), progress)
    return url


async def form_upload(
    client: aiohttp.ClientSession, endpoint: str, size: int, progress: Progress
) -> str:
    """One upload as one file part of a multipart/form-data POST with its Content-Length, as
    `curl -F file=@big.bin` sends it; the new upload's URL (its length checked)."""
    head = (
        f"--{FORM_BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{FORM_BOUNDARY}--\r\n".encode()

    async def form() -> AsyncIterator[bytes]:
        yield head
        async for block in body(size, progress):
            yield block
        yield tail

    headers = {
        "Content-Type": f"multipart/form-data; boundary={FORM_BOUNDARY}",
        "Content-Length": str(len(head) + size + len(tail)),
    }
    async with client.post(endpoint, headers=headers, data=form()) as response:
        if response.status != 201:
            raise await _fail(response, "form POST")
        [upload] = (await response.json())["uploads"]
    if upload["length"] != size:
        raise LoadError(f"form POST: stored {upload['length']} bytes, sent {size}")
    return str(upload["url"])
