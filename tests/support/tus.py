"""Speaking tus to a server from a test, over aiohttp: headers, creation, PATCH, HEAD, and the
SHA-256 a completed upload announces."""

from __future__ import annotations

import base64
import hashlib
import io

import aiohttp

from tests.support.waiting import wait_until

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_STREAM = "application/offset+octet-stream"


def patch_headers(offset: int, **extra: str) -> dict[str, str]:
    return {**TUS, "Upload-Offset": str(offset), "Content-Type": OFFSET_STREAM, **extra}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def upload_id_of(url: str) -> str:
    """The upload id at the end of an upload's URL (Location); an id stays itself."""
    return url.rstrip("/").rsplit("/", 1)[-1]


def path_of(url: str) -> str:
    """The path of an absolute URL (what a request line names)."""
    return "/" + url.split("//", 1)[1].split("/", 1)[1]


def repr_digest_of(data: bytes) -> str:
    """The Repr-Digest header (RFC 9530) of `data`, spelled out here rather than by the server's
    own code."""
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode('ascii')}:"


async def create_upload(
    http: aiohttp.ClientSession, endpoint: str, length: int | None = None, **headers: str
) -> str:
    """POST a new upload of `length` bytes (none: no Upload-Length header) at `endpoint`; its
    absolute URL."""
    sent = {**TUS, **headers}
    if length is not None:
        sent["Upload-Length"] = str(length)
    async with http.post(endpoint, headers=sent) as response:
        assert response.status == 201, await response.text()
        return response.headers["Location"]


async def head(http: aiohttp.ClientSession, url: str, **headers: str) -> aiohttp.ClientResponse:
    """The answer to a HEAD of `url`, whatever its status."""
    async with http.head(url, headers={**TUS, **headers}) as response:
        return response


async def head_offset(http: aiohttp.ClientSession, url: str, **headers: str) -> int:
    """The upload's Upload-Offset, from a HEAD that must answer 200."""
    response = await head(http, url, **headers)
    assert response.status == 200, response.status
    return int(response.headers["Upload-Offset"])


async def patch(
    http: aiohttp.ClientSession, url: str, offset: int, data: bytes, **headers: str
) -> aiohttp.ClientResponse:
    """PATCH `data` (with a Content-Length) at `offset`, `headers` added; the answer, its body
    read."""
    body = io.BytesIO(data)  # aiohttp warns about large raw bytes bodies
    async with http.patch(url, data=body, headers=patch_headers(offset, **headers)) as response:
        await response.read()
        return response


async def completed_digest(
    http: aiohttp.ClientSession, url: str, timeout_s: float = 20, **headers: str
) -> str:
    """The Repr-Digest of a complete upload, once the server has hashed it (an upload resumed
    on another process than the one that received its first bytes is hashed in the
    background)."""
    found: list[str] = []

    async def has_digest() -> bool:
        response = await head(http, url, **headers)
        assert response.status == 200, response.status
        found[:] = [response.headers.get("Repr-Digest", "")]
        return bool(found[0])

    await wait_until(has_digest, timeout_s, every_s=0.05, what=f"a Repr-Digest for {url}")
    return found[0]
