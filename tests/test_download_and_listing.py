"""GET of a completed upload (Range, safe download headers, query tokens) and the JSON
listing of the requester's uploads, against a real server, Redis and disk."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from urllib.parse import unquote

import aiohttp
import pytest

from tests.support.servers import Server, ServerFactory
from tests.support.tus import TUS, bearer, create_upload, patch_headers
from tusserver.auth import issue_token

ALL_ACTIONS = ["create", "upload", "read", "delete"]
DATA = os.urandom(1000)


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


async def completed_upload(http: aiohttp.ClientSession, server: Server, **headers: str) -> str:
    """Create an upload of DATA with `headers` (metadata, token) and send all of it; its URL."""
    url = await create_upload(http, server.url, len(DATA), **headers)
    auth = {k: v for k, v in headers.items() if k == "Authorization"}
    async with http.patch(url, data=DATA, headers=patch_headers(0, **auth)) as response:
        assert response.status == 204
    return url


# -- GET of one upload -------------------------------------------------------------------


async def test_get_of_a_completed_upload_is_its_bytes(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await completed_upload(http, server)
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(len(DATA))
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.headers["Content-Disposition"] == "attachment"
        assert await response.read() == DATA


@pytest.mark.parametrize(
    ("range_header", "start", "end"),
    [("bytes=0-9", 0, 10), ("bytes=-10", 990, 1000), ("bytes=100-199", 100, 200),
     ("bytes=995-", 995, 1000)],
)  # fmt: skip
async def test_get_with_a_range_is_206_with_exactly_those_bytes(
    server: Server, http: aiohttp.ClientSession, range_header: str, start: int, end: int
) -> None:
    url = await completed_upload(http, server)
    async with http.get(url, headers={"Range": range_header}) as response:
        assert response.status == 206
        assert response.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
        assert response.headers["Content-Length"] == str(end - start)
        assert await response.read() == DATA[start:end]


async def test_get_with_an_unsatisfiable_range_is_416(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await completed_upload(http, server)
    async with http.get(url, headers={"Range": "bytes=5000-6000"}) as response:
        assert response.status == 416
        assert response.headers.get("Content-Range") == f"bytes */{len(DATA)}"
        assert DATA[:16] not in await response.read()


async def test_get_of_an_unfinished_upload_is_409_with_a_reason(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)
    async with http.patch(url, data=b"12345", headers=patch_headers(0)) as response:
        assert response.status == 204
    async with http.get(url) as response:
        assert response.status == 409
        assert "complete" in await response.text()


HOSTILE_FILENAMES = [
    'say "hi".txt',
    "report.pdf\r\nSet-Cookie: session=stolen",
    "a\rb\nc.txt\r\n\r\n<script>alert(1)</script>",
    "../../etc/passwd",
    "..\\..\\windows\\system32\\drivers\\etc\\hosts",
    "résumé 日本語 🎉.pdf",
    "invoice\u202efdp.exe",
    "nul\x00byte;filename=evil.sh",
    "percent%22%0d%0a.txt",
]


@pytest.mark.parametrize("filename", HOSTILE_FILENAMES)
async def test_content_disposition_never_injects_headers(
    server: Server, http: aiohttp.ClientSession, filename: str
) -> None:
    filetype = b64(b"text/plain\r\nX-Evil: 1")
    metadata = f"filename {b64(filename.encode())},filetype {filetype}"
    url = await completed_upload(http, server, **{"Upload-Metadata": metadata})
    async with http.get(url) as response:
        assert response.status == 200
        assert await response.read() == DATA
        raw = [(name.decode("latin-1").lower(), value) for name, value in response.raw_headers]
    names = [name for name, _ in raw]
    assert names.count("content-disposition") == 1
    assert not {"set-cookie", "x-evil"} & set(names)
    assert len(names) == len(set(names))  # no header line was split in two
    value = next(v for n, v in raw if n == "content-disposition").decode("latin-1")
    assert re.fullmatch(r"[\x20-\x7e]+", value)
    match = re.fullmatch(r'attachment; filename="([^"\\]*)"; filename\*=UTF-8\'\'(\S+)', value)
    assert match, value
    fallback, encoded = match.groups()
    saved_as = unquote(encoded, encoding="utf-8", errors="strict")
    for name in (fallback, saved_as):
        assert not set(name) & set("/\\\r\n\x00\u202e")
        assert name.strip(".")  # never "." or ".."
    content_type = next(v for n, v in raw if n == "content-type").decode("latin-1")
    assert content_type == "application/octet-stream"


async def test_a_unicode_filename_survives_in_filename_star(
    server: Server, http: aiohttp.ClientSession
) -> None:
    filename = "résumé 日本語 🎉.pdf"
    url = await completed_upload(
        http, server, **{"Upload-Metadata": f"filename {b64(filename.encode())}"}
    )
    async with http.get(url) as response:
        value = response.headers["Content-Disposition"]
    encoded = value.split("filename*=UTF-8''", 1)[1]
    assert unquote(encoded, encoding="utf-8", errors="strict") == filename


@pytest.mark.parametrize(
    ("filetype", "served_as"),
    [
        ("image/png", "image/png"),
        ("text/html", "application/octet-stream"),
        ("image/svg+xml", "application/octet-stream"),
        ("text/html; charset=utf-8", "application/octet-stream"),
        ("application/javascript", "application/octet-stream"),
    ],
)
async def test_content_type_comes_from_filetype_only_when_safe(
    server: Server, http: aiohttp.ClientSession, filetype: str, served_as: str
) -> None:
    metadata = f"filename {b64(b'x')},filetype {b64(filetype.encode())}"
    url = await completed_upload(http, server, **{"Upload-Metadata": metadata})
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == served_as
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_download_with_a_query_token_in_secured_mode(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("s",))
    writer = bearer(issue_token("s", subject="alice", actions=["create", "upload"], ttl_s=600))
    url = await completed_upload(http, server, **writer)
    reader = issue_token("s", subject="alice", actions=["read"], ttl_s=600)
    async with http.get(url) as response:
        assert response.status == 401
    async with http.get(url, params={"token": reader}) as response:
        assert response.status == 200
        assert await response.read() == DATA
    async with http.head(url, params={"token": reader}, headers=TUS) as response:
        assert response.status == 200
        assert response.headers["Upload-Offset"] == str(len(DATA))
    strangers = issue_token("s", subject="mallory", actions=["read"], ttl_s=600)
    async with http.get(url, params={"token": strangers}) as response:
        assert response.status == 404
    # query tokens are for GET and HEAD only (they end up in logs)
    uploader = issue_token("s", subject="alice", actions=["upload"], ttl_s=600)
    async with http.patch(
        url, params={"token": uploader}, data=b"", headers=patch_headers(1000)
    ) as response:
        assert response.status == 401


# -- listing -----------------------------------------------------------------------------


async def listing(
    http: aiohttp.ClientSession,
    endpoint: str,
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> dict[str, object]:
    async with http.get(endpoint, params=params or {}, headers=headers or {}) as response:
        assert response.status == 200, await response.text()
        assert response.content_type == "application/json"
        body = await response.json()
    assert isinstance(body, dict)
    return body


def listed(body: dict[str, object]) -> list[dict[str, object]]:
    uploads = body["uploads"]
    assert isinstance(uploads, list)
    return uploads


@pytest.mark.parametrize("trailing_slash", [True, False])
async def test_listing_shows_the_requesters_uploads_with_their_fields(
    server: Server, http: aiohttp.ClientSession, trailing_slash: bool
) -> None:
    done = await completed_upload(http, server, **{"Upload-Metadata": f"filename {b64(b'a.txt')}"})
    pending = await create_upload(http, server.url, 50)
    endpoint = server.url if trailing_slash else server.url.rstrip("/")
    body = await listing(http, endpoint)
    assert set(body) == {"uploads", "next_cursor"}
    assert body["next_cursor"] is None
    by_url = {upload["url"]: upload for upload in listed(body)}
    assert set(by_url) == {done, pending}
    for upload in by_url.values():
        assert set(upload) == {
            "id", "url", "length", "offset", "state", "metadata", "sha256", "batch_path",
            "created", "expires",
        }  # fmt: skip
        assert upload["batch_path"] is None  # in no batch
        assert isinstance(upload["url"], str) and upload["url"].endswith(f"/{upload['id']}")
        assert isinstance(upload["created"], float)
    first, second = by_url[done], by_url[pending]
    assert (first["length"], first["offset"], first["state"]) == (1000, 1000, "completed")
    assert first["metadata"] == {"filename": "a.txt"}
    assert first["sha256"] == hashlib.sha256(DATA).hexdigest()
    assert (second["length"], second["offset"], second["state"]) == (50, 0, "uploading")
    assert (second["metadata"], second["sha256"]) == ({}, None)
    expires, created = second["expires"], second["created"]
    assert isinstance(expires, float) and isinstance(created, float) and expires > created


async def test_listing_shows_each_subject_only_its_own_uploads(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("s",))
    alice = bearer(issue_token("s", subject="alice", actions=ALL_ACTIONS, ttl_s=600))
    bob = bearer(issue_token("s", subject="bob", actions=ALL_ACTIONS, ttl_s=600))
    alices = {await create_upload(http, server.url, 5, **alice) for _ in range(3)}
    bobs = {await create_upload(http, server.url, 5, **bob) for _ in range(2)}
    assert {u["url"] for u in listed(await listing(http, server.url, alice))} == alices
    assert {u["url"] for u in listed(await listing(http, server.url, bob))} == bobs
    async with http.get(server.url) as response:
        assert response.status == 401


async def test_listing_pages_walk_every_upload_exactly_once(
    server: Server, http: aiohttp.ClientSession
) -> None:
    created = [await create_upload(http, server.url, 5) for _ in range(5)]
    seen: list[str] = []
    pages = 0
    cursor: object = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if isinstance(cursor, str) else {})
        body = await listing(http, server.url, params=params)
        page = listed(body)
        assert len(page) <= 2
        seen += [str(upload["url"]) for upload in page]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert pages < 10
    assert seen == created  # oldest first, none twice, none left out
    assert pages == 3


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"}, {"limit": "-1"}, {"limit": "abc"}, {"limit": "1.5"},
        {"limit": "1001"}, {"limit": ""}, {"cursor": "garbage"}, {"cursor": "x_y"},
        {"cursor": "nan_x"},
    ],
)  # fmt: skip
async def test_listing_with_a_bad_limit_or_cursor_is_400(
    server: Server, http: aiohttp.ClientSession, params: dict[str, str]
) -> None:
    await create_upload(http, server.url, 5)
    async with http.get(server.url, params=params) as response:
        assert response.status == 400
        assert await response.text()
