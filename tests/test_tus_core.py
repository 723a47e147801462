"""Black-box tests of the tus 1.0.0 core protocol and the extensions tusserver announces.

Each test talks HTTP to a real server on 127.0.0.1 (the `server` fixture, or `make_server`
with settings), against a real Redis and real files. Where the wire matters (Expect:
100-continue, a client that hangs up, a HEAD without a body) the test speaks raw HTTP/1.1
over an asyncio TCP connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import time
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime

import aiohttp
import pytest
from yarl import URL

from tests.support.raw_http import RawResponse
from tests.support.servers import Server, ServerFactory
from tests.support.tus import (
    OFFSET_STREAM,
    TUS,
    create_upload,
    head_offset,
    patch_headers,
)
from tests.support.waiting import wait_until
from tusserver import protocol
from tusserver.uploads import expiry

EXTENSIONS = {
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "expiration",
    "checksum",
    "termination",
}
EMPTY_SHA256 = hashlib.sha256(b"").digest()
IMF_FIXDATE = re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
RAW_TIMEOUT_S = 10.0
DEFERRED = {"Upload-Defer-Length": "1"}


async def assert_refusal(response: aiohttp.ClientResponse, status: int) -> str:
    """The answer is `status` with a short, non-empty, one-line plain-text reason."""
    reason = await response.text()
    assert response.status == status, reason
    assert response.content_type == "text/plain"
    assert reason.strip(), "a refusal must say why"
    assert "\n" not in reason.strip() and len(reason) < 300, reason
    assert response.headers.get("Tus-Resumable") == "1.0.0"  # every tus answer but OPTIONS's
    return reason.strip()


def files_in(server: Server) -> list[str]:
    root = server.settings.data_dir / "uploads"
    return [path.name for path in root.rglob("*") if path.is_file()]


# -- raw HTTP/1.1, for what a high-level client hides --------------------------------------


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        "Host: 127.0.0.1",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_status_and_headers(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_TIMEOUT_S)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers


async def read_response(reader: asyncio.StreamReader) -> RawResponse:
    status, headers = await read_status_and_headers(reader)
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), RAW_TIMEOUT_S)
    return RawResponse(status, headers, body)


@contextlib.asynccontextmanager
async def raw_connection(
    server: Server,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    url = URL(server.url)
    assert url.host is not None and url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


# -- OPTIONS and the endpoint --------------------------------------------------------------


async def test_options_announces_version_and_extensions(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with http.options(server.url) as response:
        assert response.status == 204
        assert response.headers["Tus-Resumable"] == "1.0.0"
        assert response.headers["Tus-Version"].split(",")[0] == "1.0.0"
        assert EXTENSIONS <= set(response.headers["Tus-Extension"].split(","))
        assert "sha1" in response.headers["Tus-Checksum-Algorithm"].split(",")
        assert "Tus-Max-Size" not in response.headers


async def test_options_shows_tus_max_size_when_a_maximum_is_set(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_size_bytes=5000)
    async with http.options(server.url) as response:
        assert response.status == 204
        assert response.headers["Tus-Max-Size"] == "5000"


@pytest.mark.parametrize("version", [None, "0.2.2", "banana"])
async def test_options_ignores_missing_or_unsupported_tus_resumable(
    server: Server, http: aiohttp.ClientSession, version: str | None
) -> None:
    headers = {} if version is None else {"Tus-Resumable": version}
    async with http.options(server.url, headers=headers) as response:
        assert response.status == 204
        assert "Tus-Version" in response.headers


@pytest.mark.parametrize("path", ["/files", "/files/"])
async def test_endpoint_answers_with_and_without_its_trailing_slash(
    server: Server, http: aiohttp.ClientSession, path: str
) -> None:
    endpoint = server.root + path
    async with http.options(endpoint, allow_redirects=False) as response:
        assert response.status == 204
    headers = {**TUS, "Upload-Length": "3"}
    async with http.post(endpoint, headers=headers, allow_redirects=False) as response:
        assert response.status == 201
        location = response.headers["Location"]
    assert await head_offset(http, location) == 0


# -- 412: Tus-Resumable --------------------------------------------------------------------


@pytest.mark.parametrize("version", [None, "0.2.2", "2.0.0"])
@pytest.mark.parametrize("method", ["POST", "HEAD", "PATCH", "DELETE"])
async def test_missing_or_unsupported_tus_resumable_is_412_and_changes_nothing(
    server: Server, http: aiohttp.ClientSession, method: str, version: str | None
) -> None:
    url = await create_upload(http, server.url, 10)
    headers = {"Upload-Length": "10"} if method == "POST" else {}
    if method == "PATCH":
        headers = {"Upload-Offset": "0", "Content-Type": OFFSET_STREAM}
    if version is not None:
        headers["Tus-Resumable"] = version
    target = server.url if method == "POST" else url
    data = b"abc" if method == "PATCH" else None
    async with http.request(method, target, headers=headers, data=data) as response:
        assert response.status == 412
        assert "1.0.0" in response.headers["Tus-Version"].split(",")
        if method != "HEAD":
            await assert_refusal(response, 412)
    assert await head_offset(http, url) == 0  # neither written nor terminated
    assert len(files_in(server)) == 1  # the POST created nothing


# -- 415, 409, 413 -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", ["application/octet-stream", "text/plain", "application/offset+octet"]
)
async def test_patch_with_wrong_content_type_is_415(
    server: Server, http: aiohttp.ClientSession, content_type: str
) -> None:
    url = await create_upload(http, server.url, 10)
    headers = patch_headers(0, **{"Content-Type": content_type})
    async with http.patch(url, data=b"abc", headers=headers) as response:
        await assert_refusal(response, 415)
    assert await head_offset(http, url) == 0


async def test_patch_content_type_with_parameters_is_accepted(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 3)
    headers = patch_headers(0, **{"Content-Type": "Application/Offset+Octet-Stream; x=1"})
    async with http.patch(url, data=b"abc", headers=headers) as response:
        assert response.status == 204


@pytest.mark.parametrize("wrong_offset", [0, 2, 4, 100])
async def test_patch_at_wrong_offset_is_409_with_current_offset_and_keeps_bytes(
    server: Server, http: aiohttp.ClientSession, wrong_offset: int
) -> None:
    url = await create_upload(http, server.url, 10)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
    async with http.patch(url, data=b"xyz", headers=patch_headers(wrong_offset)) as response:
        await assert_refusal(response, 409)
        assert response.headers["Upload-Offset"] == "3"
    assert await head_offset(http, url) == 3
    assert server.file_of(url).read_bytes() == b"abc"


async def test_upload_length_over_max_size_is_413(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_size_bytes=100)
    async with http.post(server.url, headers={**TUS, "Upload-Length": "101"}) as response:
        await assert_refusal(response, 413)
    assert files_in(server) == []
    await create_upload(http, server.url, 100)


async def test_deferred_length_declared_over_max_size_is_413(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_size_bytes=100)
    url = await create_upload(http, server.url, None, **DEFERRED)
    headers = patch_headers(0, **{"Upload-Length": "101"})
    async with http.patch(url, data=b"abc", headers=headers) as response:
        await assert_refusal(response, 413)
    assert await head_offset(http, url) == 0


async def test_patch_whose_content_length_passes_upload_length_is_refused_unread(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 5)
    path = URL(url).path
    async with raw_connection(server) as (reader, writer):
        # Only the headers go out: the 413 must come before any byte of the body.
        writer.write(request_head("PATCH", path, patch_headers(0, **{"Content-Length": "6"})))
        response = await read_response(reader)
    assert response.status == 413
    assert response.body.strip()
    assert await head_offset(http, url) == 0
    assert server.file_of(url).read_bytes() == b""


async def test_chunked_patch_running_past_upload_length_is_413_and_keeps_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)

    async def body() -> AsyncIterator[bytes]:
        yield b"aaaaaa"
        yield b"bbbbbb"

    async with http.patch(url, data=body(), headers=patch_headers(0)) as response:
        assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
        await assert_refusal(response, 413)
    assert await head_offset(http, url) == 0
    async with http.patch(url, data=b"0123456789", headers=patch_headers(0)) as response:
        assert response.status == 204
    assert server.file_of(url).read_bytes() == b"0123456789"


async def test_chunked_patch_within_upload_length_is_kept(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)

    async def body() -> AsyncIterator[bytes]:
        yield b"01234"
        yield b"567"

    async with http.patch(url, data=body(), headers=patch_headers(0)) as response:
        assert response.status == 204
        assert response.headers["Upload-Offset"] == "8"
    assert server.file_of(url).read_bytes() == b"01234567"


# -- 404 and 410 ---------------------------------------------------------------------------

UNKNOWN_IDS = [
    "0123456789abcdef0123456789abcdef",  # well-formed, never created
    "..",
    "%2e%2e",
    "..%2F..%2Fetc%2Fpasswd",
    "%2E%2E%2Fredis%2Fvalkey.conf",
    "ab%2Fcd",
    "0123456789ABCDEF0123456789ABCDEF",
    "f" * 1000,
]


@pytest.mark.parametrize("upload_id", UNKNOWN_IDS)
@pytest.mark.parametrize("method", ["HEAD", "PATCH", "DELETE"])
async def test_unknown_upload_is_404(
    server: Server, http: aiohttp.ClientSession, method: str, upload_id: str
) -> None:
    await create_upload(http, server.url, 3)  # something exists, and must stay untouched
    url = URL(server.url + upload_id, encoded=True)
    data = b"abc" if method == "PATCH" else None
    async with http.request(method, url, headers=patch_headers(0), data=data) as response:
        assert response.status == 404
        assert "Upload-Offset" not in response.headers
        if method != "HEAD":
            await assert_refusal(response, 404)
    assert len(files_in(server)) == 1


async def test_terminated_upload_is_404_for_its_owner_with_the_reason_by_default(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """404, not 410: TUSKit, tus-java-client and the Dart clients start over only on 404
    (docs/clients.md); the body still says what happened, unlike an unknown id's."""
    url = await create_upload(http, server.url, 10)
    async with http.delete(url, headers=TUS) as response:
        assert response.status == 204
    async with http.head(url, headers=TUS) as response:
        assert response.status == 404
        assert "Upload-Offset" not in response.headers
    for method, data in (("PATCH", b"abc"), ("DELETE", None), ("GET", None)):
        async with http.request(method, url, data=data, headers=patch_headers(0)) as response:
            assert await assert_refusal(response, 404) == "this upload was terminated"
    unknown = server.url + "0123456789abcdef0123456789abcdef"
    async with http.patch(unknown, data=b"abc", headers=patch_headers(0)) as response:
        assert await assert_refusal(response, 404) == "no such upload"


async def test_terminated_upload_is_410_for_its_owner_then_404_once_the_tombstone_expires(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(tombstone_ttl_s=1.0, gone_status=410)
    url = await create_upload(http, server.url, 10)
    async with http.delete(url, headers=TUS) as response:
        assert response.status == 204
    async with http.head(url, headers=TUS) as response:
        assert response.status == 410
        assert "Upload-Offset" not in response.headers

    async def is_404() -> bool:
        async with http.head(url, headers=TUS) as response:
            assert response.status in (404, 410)
            return response.status == 404

    await wait_until(is_404)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        await assert_refusal(response, 404)


# -- 400: malformed headers ----------------------------------------------------------------

BAD_INTEGERS = ["-1", "1.5", "abc", "", "1e3", "+5", "0x10", "1 2", "99999999999999999999999"]


@pytest.mark.parametrize("value", BAD_INTEGERS)
async def test_post_with_malformed_upload_length_is_400(
    server: Server, http: aiohttp.ClientSession, value: str
) -> None:
    async with http.post(server.url, headers={**TUS, "Upload-Length": value}) as response:
        reason = await assert_refusal(response, 400)
    assert "Upload-Length" in reason
    assert files_in(server) == []


@pytest.mark.parametrize("value", BAD_INTEGERS)
async def test_patch_with_malformed_upload_offset_is_400(
    server: Server, http: aiohttp.ClientSession, value: str
) -> None:
    url = await create_upload(http, server.url, 10)
    headers = {**TUS, "Content-Type": OFFSET_STREAM, "Upload-Offset": value}
    async with http.patch(url, data=b"abc", headers=headers) as response:
        reason = await assert_refusal(response, 400)
    assert "Upload-Offset" in reason
    assert await head_offset(http, url) == 0


async def test_patch_without_upload_offset_is_400(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)
    headers = {**TUS, "Content-Type": OFFSET_STREAM}
    async with http.patch(url, data=b"abc", headers=headers) as response:
        await assert_refusal(response, 400)
    assert await head_offset(http, url) == 0


@pytest.mark.parametrize("value", BAD_INTEGERS)
async def test_patch_with_malformed_upload_length_is_400(
    server: Server, http: aiohttp.ClientSession, value: str
) -> None:
    url = await create_upload(http, server.url, None, **DEFERRED)
    headers = patch_headers(0, **{"Upload-Length": value})
    async with http.patch(url, data=b"abc", headers=headers) as response:
        await assert_refusal(response, 400)
    assert await head_offset(http, url) == 0


@pytest.mark.parametrize(
    "metadata",
    [
        "name !!notbase64!!",
        "name YWJj=",  # bad padding
        "name YQ==,name Yg==",  # duplicate key
        "name YQ==,name",  # duplicate key, once without a value
        " ,name YQ==",  # an empty first pair
        "name YQ==,,size MTA=",  # an empty pair
        "name YQ==, ",  # an empty last pair
        ",",
        "name Y Q==",  # a space inside the value
        "n\u00e4me YQ==",  # a key that is not ASCII
    ],
)
async def test_post_with_malformed_upload_metadata_is_400(
    server: Server, http: aiohttp.ClientSession, metadata: str
) -> None:
    headers = {**TUS, "Upload-Length": "3", "Upload-Metadata": metadata}
    async with http.post(server.url, headers=headers) as response:
        reason = await assert_refusal(response, 400)
    assert "Upload-Metadata" in reason
    assert files_in(server) == []


async def test_post_with_both_upload_length_and_defer_length_is_400(
    server: Server, http: aiohttp.ClientSession
) -> None:
    headers = {**TUS, "Upload-Length": "3", "Upload-Defer-Length": "1"}
    async with http.post(server.url, headers=headers) as response:
        await assert_refusal(response, 400)
    assert files_in(server) == []


async def test_post_with_neither_upload_length_nor_defer_length_is_400(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with http.post(server.url, headers=TUS) as response:
        await assert_refusal(response, 400)
    assert files_in(server) == []


@pytest.mark.parametrize("value", ["0", "2", "true", ""])
async def test_post_with_upload_defer_length_other_than_1_is_400(
    server: Server, http: aiohttp.ClientSession, value: str
) -> None:
    async with http.post(server.url, headers={**TUS, "Upload-Defer-Length": value}) as response:
        await assert_refusal(response, 400)
    assert files_in(server) == []


# -- HEAD ----------------------------------------------------------------------------------


async def test_head_of_a_new_upload_shows_offset_0_length_and_no_store(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)
    async with http.head(url, headers=TUS) as response:
        assert response.status == 200
        assert response.headers["Tus-Resumable"] == "1.0.0"
        assert response.headers["Upload-Offset"] == "0"
        assert response.headers["Upload-Length"] == "10"
        assert response.headers["Cache-Control"] == "no-store"
        assert "Upload-Defer-Length" not in response.headers
        assert "Upload-Metadata" not in response.headers


async def test_head_of_a_complete_upload_still_shows_its_offset(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 3)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
    async with http.head(url, headers=TUS) as response:
        assert response.status == 200
        assert response.headers["Upload-Offset"] == "3"
        assert response.headers["Upload-Length"] == "3"
        assert response.headers["Cache-Control"] == "no-store"
        assert response.headers["Repr-Digest"] == protocol.format_repr_digest(
            hashlib.sha256(b"abc").digest()
        )


async def test_head_answer_has_no_body(server: Server, http: aiohttp.ClientSession) -> None:
    url = await create_upload(http, server.url, 10, **{"Upload-Metadata": "name YWJj"})
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("HEAD", URL(url).path, {**TUS, "Connection": "close"}))
        answer = await asyncio.wait_for(reader.read(), RAW_TIMEOUT_S)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert rest == b""


async def test_head_of_a_deferred_upload_shows_defer_length_until_the_length_is_set(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, None, **DEFERRED)
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Upload-Defer-Length"] == "1"
        assert "Upload-Length" not in response.headers
        assert response.headers["Upload-Offset"] == "0"
    headers = patch_headers(0, **{"Upload-Length": "3"})
    async with http.patch(url, data=b"abc", headers=headers) as response:
        assert response.status == 204
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Upload-Length"] == "3"
        assert "Upload-Defer-Length" not in response.headers


# -- metadata ------------------------------------------------------------------------------


async def test_metadata_round_trips_with_binary_values_and_keys_without_values(
    server: Server, http: aiohttp.ClientSession
) -> None:
    metadata: dict[str, bytes | None] = {
        "filename": "na\u00efve r\u00e9sum\u00e9.pdf".encode(),
        "blob": bytes(range(256)) + b"\xff\xfe\x00",  # not UTF-8
        "is_confidential": None,
        "filetype": b"application/pdf",
    }
    sent = protocol.format_metadata(metadata)
    url = await create_upload(http, server.url, 3, **{"Upload-Metadata": sent})
    async with http.head(url, headers=TUS) as response:
        echoed = response.headers["Upload-Metadata"]
    assert echoed == sent
    assert protocol.parse_metadata(echoed) == metadata


async def test_metadata_in_another_valid_spelling_keeps_its_meaning(
    server: Server, http: aiohttp.ClientSession
) -> None:
    sent = "name YQ, size  MTA=,flag"  # unpadded base64, spaces around pairs, a bare key
    url = await create_upload(http, server.url, 3, **{"Upload-Metadata": sent})
    async with http.head(url, headers=TUS) as response:
        echoed = response.headers["Upload-Metadata"]
    assert protocol.parse_metadata(echoed) == {"name": b"a", "size": b"10", "flag": None}


# -- creation-with-upload, creation-defer-length, empty uploads ----------------------------


async def test_creation_with_upload_stores_the_body_and_answers_its_offset(
    server: Server, http: aiohttp.ClientSession
) -> None:
    headers = {**TUS, "Upload-Length": "11", "Content-Type": OFFSET_STREAM}
    async with http.post(server.url, data=b"hello", headers=headers) as response:
        assert response.status == 201
        assert response.headers["Upload-Offset"] == "5"
        url = response.headers["Location"]
    assert server.file_of(url).read_bytes() == b"hello"
    assert await head_offset(http, url) == 5
    async with http.patch(url, data=b" world", headers=patch_headers(5)) as response:
        assert response.status == 204
    assert server.file_of(url).read_bytes() == b"hello world"


async def test_creation_with_the_whole_upload_completes_it(
    server: Server, http: aiohttp.ClientSession
) -> None:
    headers = {**TUS, "Upload-Length": "5", "Content-Type": OFFSET_STREAM}
    async with http.post(server.url, data=b"hello", headers=headers) as response:
        assert response.status == 201
        assert response.headers["Upload-Offset"] == "5"
        url = response.headers["Location"]
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Repr-Digest"] == protocol.format_repr_digest(
            hashlib.sha256(b"hello").digest()
        )


async def test_creation_with_a_body_past_upload_length_is_413_and_keeps_none_of_it(
    server: Server, http: aiohttp.ClientSession
) -> None:
    headers = {**TUS, "Upload-Length": "3", "Content-Type": OFFSET_STREAM}
    async with http.post(server.url, data=b"hello", headers=headers) as response:
        await assert_refusal(response, 413)
        location = response.headers.get("Location")
    if location is not None:  # the upload exists: it holds nothing of the refused body
        assert await head_offset(http, location) == 0


async def test_deferred_length_is_set_by_a_later_patch(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, None, **DEFERRED)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
        assert response.headers["Upload-Offset"] == "3"
    headers = patch_headers(3, **{"Upload-Length": "6"})
    async with http.patch(url, data=b"def", headers=headers) as response:
        assert response.status == 204
        assert response.headers["Upload-Offset"] == "6"
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Upload-Length"] == "6"
        assert response.headers["Upload-Offset"] == "6"
        assert "Upload-Defer-Length" not in response.headers
        assert "Repr-Digest" in response.headers
    assert server.file_of(url).read_bytes() == b"abcdef"


async def test_a_later_contradicting_upload_length_is_400(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, None, **DEFERRED)
    headers = patch_headers(0, **{"Upload-Length": "5"})
    async with http.patch(url, data=b"ab", headers=headers) as response:
        assert response.status == 204
    headers = patch_headers(2, **{"Upload-Length": "7"})
    async with http.patch(url, data=b"cd", headers=headers) as response:
        await assert_refusal(response, 400)
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Upload-Length"] == "5"
        assert response.headers["Upload-Offset"] == "2"


async def test_upload_length_on_patch_of_a_known_length_upload_must_agree(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 5)
    headers = patch_headers(0, **{"Upload-Length": "5"})
    async with http.patch(url, data=b"ab", headers=headers) as response:
        assert response.status == 204
    headers = patch_headers(2, **{"Upload-Length": "9"})
    async with http.patch(url, data=b"cd", headers=headers) as response:
        await assert_refusal(response, 400)
    assert await head_offset(http, url) == 2


async def test_deferred_length_shorter_than_the_bytes_received_is_400(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, None, **DEFERRED)
    async with http.patch(url, data=b"abcd", headers=patch_headers(0)) as response:
        assert response.status == 204
    headers = patch_headers(4, **{"Upload-Length": "2"})
    async with http.patch(url, data=b"", headers=headers) as response:
        await assert_refusal(response, 400)
    async with http.head(url, headers=TUS) as response:
        assert response.headers["Upload-Defer-Length"] == "1"


async def test_zero_length_upload_is_complete_at_once(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 0)
    async with http.head(url, headers=TUS) as response:
        assert response.status == 200
        assert response.headers["Upload-Offset"] == "0"
        assert response.headers["Upload-Length"] == "0"
        assert response.headers["Repr-Digest"] == protocol.format_repr_digest(EMPTY_SHA256)
        assert "Upload-Expires" not in response.headers
    async with http.patch(url, data=b"x", headers=patch_headers(0)) as response:
        await assert_refusal(response, 413)
    assert server.file_of(url).read_bytes() == b""


# -- expiration ----------------------------------------------------------------------------


def assert_http_date_in_future(value: str) -> None:
    assert IMF_FIXDATE.fullmatch(value), value
    assert parsedate_to_datetime(value).timestamp() > time.time()


async def test_post_and_patch_answers_carry_upload_expires(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with http.post(server.url, headers={**TUS, "Upload-Length": "6"}) as response:
        assert response.status == 201
        assert_http_date_in_future(response.headers["Upload-Expires"])
        url = response.headers["Location"]
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
        assert_http_date_in_future(response.headers["Upload-Expires"])
    async with http.head(url, headers=TUS) as response:
        assert_http_date_in_future(response.headers["Upload-Expires"])


async def test_unfinished_upload_is_removed_once_it_expires(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(expire_after_s=0.5)
    url = await create_upload(http, server.url, 10)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
    assert server.file_of(url).exists()
    assert await expiry.sweep_once(server.uploads, now=time.time() + 1) == 1
    async with http.head(url, headers=TUS) as response:
        assert response.status == 404  # --gone-status: 404 by default
    async with http.patch(url, data=b"def", headers=patch_headers(3)) as response:
        assert await assert_refusal(response, 404) == "this upload was expired"
    assert not server.file_of(url).exists()


async def test_expired_upload_is_410_with_gone_status_410(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(expire_after_s=0.5, gone_status=410)
    url = await create_upload(http, server.url, 10)
    assert await expiry.sweep_once(server.uploads, now=time.time() + 1) == 1
    async with http.head(url, headers=TUS) as response:
        assert response.status == 410
    async with http.patch(url, data=b"def", headers=patch_headers(0)) as response:
        assert await assert_refusal(response, 410) == "this upload was expired"


async def test_upload_not_yet_expired_is_left_alone_by_the_sweeper(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(expire_after_s=60)
    url = await create_upload(http, server.url, 10)
    assert await expiry.sweep_once(server.uploads, now=time.time() + 1) == 0
    assert await head_offset(http, url) == 0


async def test_completed_upload_does_not_expire(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(expire_after_s=0.5)
    url = await create_upload(http, server.url, 3)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
        assert "Upload-Expires" not in response.headers
    await expiry.sweep_once(server.uploads, now=time.time() + 3600)
    assert await head_offset(http, url) == 3
    assert server.file_of(url).read_bytes() == b"abc"


# -- termination ---------------------------------------------------------------------------


async def test_delete_terminates_the_upload(server: Server, http: aiohttp.ClientSession) -> None:
    url = await create_upload(http, server.url, 10)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
    async with http.delete(url, headers=TUS) as response:
        assert response.status == 204
        assert response.headers["Tus-Resumable"] == "1.0.0"
    assert not server.file_of(url).exists()
    async with http.head(url, headers=TUS) as response:
        assert response.status == 404
    async with http.patch(url, data=b"def", headers=patch_headers(3)) as response:
        assert "terminated" in await assert_refusal(response, 404)
    async with http.delete(url, headers=TUS) as response:
        assert "terminated" in await assert_refusal(response, 404)


async def test_delete_of_a_completed_upload_terminates_it(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 3)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
    async with http.delete(url, headers=TUS) as response:
        assert response.status == 204
    assert not server.file_of(url).exists()
    async with http.get(url, headers=TUS) as response:
        assert "terminated" in await assert_refusal(response, 404)


# -- X-HTTP-Method-Override ----------------------------------------------------------------


async def test_post_with_method_override_patch_appends(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)
    headers = patch_headers(0, **{"X-HTTP-Method-Override": "PATCH"})
    async with http.post(url, data=b"abc", headers=headers) as response:
        assert response.status == 204
        assert response.headers["Upload-Offset"] == "3"
    assert server.file_of(url).read_bytes() == b"abc"


async def test_post_with_method_override_delete_terminates(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)
    async with http.post(url, headers={**TUS, "X-HTTP-Method-Override": "DELETE"}) as response:
        assert response.status == 204
    assert not server.file_of(url).exists()
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert "terminated" in await assert_refusal(response, 404)


async def test_method_override_is_checked_for_tus_resumable_as_the_effective_method(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)
    headers = {"Upload-Offset": "0", "Content-Type": OFFSET_STREAM}
    headers["X-HTTP-Method-Override"] = "PATCH"
    async with http.post(url, data=b"abc", headers=headers) as response:
        await assert_refusal(response, 412)
    assert await head_offset(http, url) == 0


# -- a client that hangs up ----------------------------------------------------------------


async def test_patch_cut_short_keeps_the_bytes_the_server_read(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 8 * 2**20)
    sent = os.urandom(5 * 2**20)
    headers = patch_headers(0, **{"Content-Length": str(8 * 2**20)})

    async def has_committed_a_block() -> bool:  # HEAD makes the running PATCH commit
        return await head_offset(http, url) >= 4 * 2**20

    async def is_over() -> bool:
        return not await server.is_locked(url)

    async with raw_connection(server) as (_reader, writer):
        writer.write(request_head("PATCH", URL(url).path, headers) + sent)
        await writer.drain()
        await wait_until(has_committed_a_block)
    await wait_until(is_over)
    offset = await head_offset(http, url)
    assert 4 * 2**20 <= offset <= len(sent)
    assert server.file_of(url).read_bytes()[:offset] == sent[:offset]
    async with http.patch(url, data=b"more", headers=patch_headers(offset)) as response:
        assert response.status == 204
    assert server.file_of(url).read_bytes() == sent[:offset] + b"more"


async def test_patch_cut_short_keeps_every_byte_that_reached_the_server(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 2**20)
    sent = os.urandom(300 * 1024)
    headers = patch_headers(0, **{"Content-Length": str(2**20)})
    async with raw_connection(server) as (_reader, writer):
        writer.write(request_head("PATCH", URL(url).path, headers) + sent)
        await writer.drain()

    async def holds_what_was_sent() -> bool:
        return await head_offset(http, url) == len(sent)

    await wait_until(holds_what_was_sent, timeout_s=5)
    assert server.file_of(url).read_bytes()[: len(sent)] == sent


async def test_checksummed_patch_cut_short_keeps_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 2**20)
    whole = os.urandom(2**20)
    digest = base64.b64encode(hashlib.sha256(whole).digest()).decode()
    headers = patch_headers(
        0, **{"Content-Length": str(2**20), "Upload-Checksum": f"sha256 {digest}"}
    )

    async def is_running() -> bool:
        return await server.is_locked(url)

    async def is_over() -> bool:
        return not await server.is_locked(url)

    async with raw_connection(server) as (_reader, writer):
        writer.write(request_head("PATCH", URL(url).path, headers) + whole[: 300 * 1024])
        await writer.drain()
        await wait_until(is_running)
    await wait_until(is_over)
    assert await head_offset(http, url) == 0
    assert server.file_of(url).read_bytes() == b""
    async with http.patch(url, data=b"xyz", headers=patch_headers(0)) as response:
        assert response.status == 204
    assert server.file_of(url).read_bytes() == b"xyz"


# -- Expect: 100-continue ------------------------------------------------------------------


async def test_expect_continue_at_a_wrong_offset_is_refused_before_the_body(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)
    async with http.patch(url, data=b"abc", headers=patch_headers(0)) as response:
        assert response.status == 204
    headers = patch_headers(0, **{"Content-Length": "3", "Expect": "100-continue"})
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("PATCH", URL(url).path, headers))  # no body, ever
        answer = await read_response(reader)
        assert answer.status == 409  # not 100 Continue first
        assert answer.headers["upload-offset"] == "3"
        assert answer.headers["connection"].lower() == "close"
    assert server.file_of(url).read_bytes() == b"abc"


async def test_expect_continue_at_the_right_offset_gets_100_then_204(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 10)
    headers = patch_headers(0, **{"Content-Length": "3", "Expect": "100-continue"})
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("PATCH", URL(url).path, headers))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RAW_TIMEOUT_S)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abc")
        response = await read_response(reader)
    assert response.status == 204
    assert response.headers["upload-offset"] == "3"
    assert server.file_of(url).read_bytes() == b"abc"


@pytest.mark.parametrize("refusal", ["unknown upload", "wrong content type"])
async def test_expect_continue_gets_an_early_refusal(
    server: Server, http: aiohttp.ClientSession, refusal: str
) -> None:
    url = await create_upload(http, server.url, 10)
    path = URL(url).path
    headers = patch_headers(0, **{"Content-Length": "3", "Expect": "100-continue"})
    if refusal == "unknown upload":
        path = URL(server.url).path + "0123456789abcdef0123456789abcdef"
    else:
        headers["Content-Type"] = "application/octet-stream"
    async with raw_connection(server) as (reader, writer):
        writer.write(request_head("PATCH", path, headers))
        response = await read_response(reader)
        assert response.status == (404 if refusal == "unknown upload" else 415)
        assert response.headers["connection"].lower() == "close"
        assert response.body.strip()
    assert await head_offset(http, url) == 0


# -- long headers --------------------------------------------------------------------------


async def test_upload_metadata_of_30_kb_is_accepted_and_echoed(server: Server) -> None:
    metadata: dict[str, bytes | None] = {"blob": os.urandom(22_000), "name": b"big"}
    sent = protocol.format_metadata(metadata)
    assert len(sent) > 29_000
    async with aiohttp.ClientSession(max_field_size=128 * 1024) as http:
        url = await create_upload(http, server.url, 3, **{"Upload-Metadata": sent})
        async with http.head(url, headers=TUS) as response:
            assert response.status == 200
            assert response.headers["Upload-Metadata"] == sent


async def test_upload_metadata_past_the_limit_is_400_with_a_reason(
    server: Server, http: aiohttp.ClientSession
) -> None:
    sent = protocol.format_metadata({"blob": os.urandom(protocol.MAX_METADATA_BYTES)})
    assert len(sent) > protocol.MAX_METADATA_BYTES
    headers = {**TUS, "Upload-Length": "3", "Upload-Metadata": sent}
    async with http.post(server.url, headers=headers) as response:
        reason = await assert_refusal(response, 400)
    assert "Upload-Metadata" in reason
    assert files_in(server) == []


# -- stopping ------------------------------------------------------------------------------


async def test_the_sweeper_stops_when_cancelled_in_the_middle_of_a_sweep(server: Server) -> None:
    for attempt in range(40):
        sweeper = asyncio.create_task(expiry.sweep_forever(server.uploads, 30))
        for _ in range(1 + attempt % 20):  # land the cancel at another step of the sweep
            await asyncio.sleep(0)
        sweeper.cancel()
        done, _ = await asyncio.wait([sweeper], timeout=2)
        if not done:
            sweeper.cancel()  # a second cancel lands in its sleep and ends it
            await asyncio.wait([sweeper], timeout=2)
        assert done, f"the sweeper kept running after its cancel (attempt {attempt})"
