"""Issue 18, "Hostile input": a test for each defect the issue lists, against real servers,
with requests written byte by byte on plain sockets where an HTTP client would tidy them up
(a Host with a space, an Expect header in Latin-1, a header sent twice).

Defect 1 (connection limits, memory) is tests/test_connection_limits.py; the bounded fuzz is
tests/test_hostile_fuzz.py. Defects 6, 8 and 9 already have their tests:
- 6, an oversized creation body leaving an upload behind: test_auth_http.py
  test_deferred_creation_with_upload_past_the_tokens_max_is_413 (the token's maximum; the
  --max-size and Upload-Length cases are below);
- 8, concatenation amplification: test_checksum_concat_download.py
  test_a_final_naming_a_partial_twice_is_refused and
  test_a_final_of_more_parts_than_allowed_is_refused;
- 9, development mode answering any origin: test_cors.py
  test_development_mode_allows_loopback_origins_only_without_credentials.
"""

from __future__ import annotations

import gzip
import logging
import os
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import cast

import aiohttp
import pytest
import redis.asyncio as aioredis
from itsdangerous import URLSafeSerializer, base64_encode

from tests.support.files import file_of
from tests.support.raw_http import RawResponse, exchange, request_bytes
from tests.support.servers import Server, ServerFactory
from tests.support.tus import (
    OFFSET_STREAM,
    TUS,
    bearer,
    create_upload,
    head_offset,
    patch,
    upload_id_of,
)
from tusserver.auth import TOKEN_SALT
from tusserver.events.delivery import events_key
from tusserver.http.demo import STATIC_DIR, STATIC_PREFIX
from tusserver.protocol import SINGLE_VALUE_HEADERS
from tusserver.settings import SettingError, Settings
from tusserver.store.records import shard_of

SECRET = "hostile-input-secret"
Headers = Iterable[tuple[str | bytes, str | bytes]]


def host_of(url: str) -> str:
    return url.split("//", 1)[1].split("/", 1)[0]


async def send(
    server: Server,
    method: str,
    target: str | bytes,
    headers: Headers = (),
    body: bytes = b"",
    *,
    host: str | bytes | None = None,
) -> RawResponse:
    """One request on a new connection, exactly as given, with a Host header (the server's
    own unless `host`) and, when there is a body, its Content-Length."""
    sent: list[tuple[str | bytes, str | bytes]] = [
        ("Host", host_of(server.url) if host is None else host)
    ]
    sent += headers
    if body:
        sent.append(("Content-Length", str(len(body))))
    data = request_bytes(method, target, sent, body)
    return await exchange(server.url, data, has_body=method != "HEAD")


def path_of(url: str) -> str:
    return "/" + url.split("//", 1)[1].split("/", 1)[1]


async def assert_nothing_created(server: Server, owner: str = "anonymous") -> None:
    """No upload record (the owner's index) and no upload file."""
    assert await server.uploads.list_owned(owner, None, 1000) == []
    assert list((server.settings.data_dir / "uploads").glob("*/*")) == []


async def assert_health(server: Server) -> None:
    """The server still answers a plain request."""
    assert (await send(server, "GET", "/health")).status == 200


CREATION = [*TUS.items(), ("Upload-Length", "5")]


# -- 2: a compressed body is refused, not decompressed and cut ------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "gzip, identity", "x-unknown"])
async def test_a_patch_with_a_content_encoding_is_refused_and_keeps_nothing(
    server: Server, http: aiohttp.ClientSession, encoding: str
) -> None:
    """aiohttp decompressed a gzip body and cut it at Content-Length: 204, wrong bytes. (A
    body that aiohttp's decoder cannot read is its own 400, before any handler.)"""
    data = os.urandom(2000)
    body = zlib.compress(data) if encoding == "deflate" else gzip.compress(data)
    url = await create_upload(http, server.url, len(data))
    response = await patch(http, url, 0, body, **{"Content-Encoding": encoding})
    assert response.status in (400, 415)
    assert await head_offset(http, url) == 0
    assert server.file_of(url).read_bytes() == b""


async def test_a_patch_sent_as_identity_is_stored_as_sent(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 6)
    for offset, encoding in ((0, "identity"), (3, "Identity")):
        response = await patch(http, url, offset, b"abc", **{"Content-Encoding": encoding})
        assert response.status == 204
    assert server.file_of(url).read_bytes() == b"abcabc"


async def test_a_creation_with_a_compressed_body_is_415_and_creates_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    body = gzip.compress(b"hello")
    headers = {**TUS, "Upload-Length": "5", "Content-Type": OFFSET_STREAM,
               "Content-Encoding": "gzip"}  # fmt: skip
    async with http.post(server.url, data=body, headers=headers) as response:
        assert response.status == 415
        assert "Location" not in response.headers
    await assert_nothing_created(server)


# -- 3: no 500 for odd listing parameters ------------------------------------------------------


@pytest.mark.parametrize(
    "limit",
    ["%D9%A1", "%EF%BC%91", "9" * 5000, "0", "-1", "1001", "+1", "1.0", "%201", "0x10", ""],
    ids=[
        "arabic-indic 1",
        "fullwidth 1",
        "huge",
        "0",
        "-1",
        "1001",
        "+1",
        "1.0",
        " 1",
        "hex",
        "empty",
    ],
)
async def test_a_listing_limit_that_is_not_1_to_1000_in_ascii_digits_is_400(
    server: Server, limit: str
) -> None:
    answer = await send(server, "GET", f"/files/?limit={limit}", TUS.items())
    assert answer.status == 400, answer
    assert b"limit" in answer.body


async def test_listing_pages_follow_the_cursor_they_give_out(
    server: Server, http: aiohttp.ClientSession
) -> None:
    urls = [await create_upload(http, server.url, 1) for _ in range(3)]
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(3):
        params = {"limit": "1", **({"cursor": cursor} if cursor else {})}
        async with http.get(server.url, params=params) as response:
            assert response.status == 200
            page = await response.json()
        seen += [upload["id"] for upload in page["uploads"]]
        cursor = page["next_cursor"]
    assert seen == [upload_id_of(url) for url in urls]
    async with http.get(server.url, params={"limit": "1000"}) as response:
        assert response.status == 200


@pytest.mark.parametrize(
    "cursor",
    [
        "x",
        "nan_" + "a" * 32,
        "1e308_" + "a" * 32,
        "inf_" + "a" * 32,
        "%D9%A1.000000_" + "a" * 32,
        "1700000000.000000_" + "A" * 32,
        "1700000000.000000_" + "a" * 31,
        "1700000000.000000_" + "a" * 32 + "/..",
        "1" * 5000 + ".000000_" + "a" * 32,
    ],
)
async def test_a_cursor_of_another_shape_than_the_servers_is_400(
    server: Server, cursor: str
) -> None:
    answer = await send(server, "GET", f"/files/?cursor={cursor}", TUS.items())
    assert answer.status == 400, answer
    assert b"cursor" in answer.body


# -- 3 and 7: the Host header ------------------------------------------------------------------

HOSTILE_HOSTS: list[str | bytes] = [
    "ev il",
    "\u00e9vil.example".encode(),
    b"\xff\xfe",
    "evil.example",
    "127.0.0.1@evil.example",
    "127.0.0.1/evil",
    "",
]
HOST_IDS = ["space", "utf-8", "latin-1", "evil.example", "userinfo", "path", "empty"]


@pytest.mark.parametrize("host", HOSTILE_HOSTS, ids=HOST_IDS)
async def test_a_creation_under_a_host_not_allowed_is_400_and_creates_nothing(
    server: Server, host: str | bytes
) -> None:
    """Also with a body: nothing may be created before the request is known acceptable."""
    assert (await send(server, "POST", "/files/", CREATION, host=host)).status == 400
    with_body = [*CREATION, ("Content-Type", OFFSET_STREAM)]
    answer = await send(server, "POST", "/files/", with_body, b"hello", host=host)
    assert answer.status == 400, answer
    assert "location" not in answer.headers
    await assert_nothing_created(server)


async def test_a_creation_without_a_host_is_400(server: Server) -> None:
    answer = await exchange(server.url, request_bytes("POST", "/files/", CREATION))
    assert answer.status == 400, answer
    await assert_nothing_created(server)


async def upload_partials(http: aiohttp.ClientSession, server: Server, parts: int) -> list[str]:
    urls = []
    for _ in range(parts):
        url = await create_upload(http, server.url, 2, **{"Upload-Concat": "partial"})
        assert (await patch(http, url, 0, b"ab")).status == 204
        urls.append(url)
    return urls


@pytest.mark.parametrize("host", HOSTILE_HOSTS, ids=HOST_IDS)
async def test_a_concatenation_under_a_host_not_allowed_is_400_and_creates_nothing(
    server: Server, http: aiohttp.ClientSession, host: str | bytes
) -> None:
    partials = await upload_partials(http, server, 2)
    before = await server.uploads.list_owned("anonymous", None, 1000)
    files = sorted((server.settings.data_dir / "uploads").glob("*/*"))
    concat = "final;" + " ".join(path_of(url) for url in partials)
    headers = [*TUS.items(), ("Upload-Concat", concat)]
    answer = await send(server, "POST", "/files/", headers, host=host)
    assert answer.status == 400, answer
    assert await server.uploads.list_owned("anonymous", None, 1000) == before
    assert sorted((server.settings.data_dir / "uploads").glob("*/*")) == files


@pytest.mark.parametrize("host", HOSTILE_HOSTS, ids=HOST_IDS)
async def test_head_of_a_final_upload_names_its_parts_whatever_the_host(
    server: Server, http: aiohttp.ClientSession, host: str | bytes
) -> None:
    """The parts' URLs come from the final upload's stored URL, not from the request."""
    partials = await upload_partials(http, server, 2)
    concat = "final;" + " ".join(path_of(url) for url in partials)
    final = await create_upload(http, server.url, None, **{"Upload-Concat": concat})
    answer = await send(server, "HEAD", path_of(final), TUS.items(), host=host)
    assert answer.status == 200, answer
    assert answer.headers["upload-concat"] == "final;" + " ".join(partials)
    assert answer.headers["upload-length"] == "4"


# -- 7: upload URLs come from --public-url or an allowed host -----------------------------------


@pytest.fixture
async def events_redis(flushed_redis: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(flushed_redis, decode_responses=True)
    yield client
    await client.aclose()


async def event_urls(client: aioredis.Redis, upload_id: str) -> list[str]:
    """The `url` of each event of the upload in its outbox stream (what a parent receives)."""
    stream = events_key(shard_of(upload_id))
    entries = cast(list[tuple[str, dict[str, str]]], await client.xrange(stream))
    return [fields["url"] for _id, fields in entries if fields["upload_id"] == upload_id]


async def test_upload_urls_and_their_events_use_only_an_allowed_host(
    make_server: ServerFactory, events_redis: aioredis.Redis
) -> None:
    """Development mode without --allowed-hosts: loopback names only."""
    server = await make_server(allowed_hosts=())
    port = host_of(server.url).rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
        answer = await send(server, "POST", "/files/", CREATION, host=host)
        assert answer.status == 201, answer
        location = answer.headers["location"]
        assert location.startswith(f"http://{host}/files/")
        assert await event_urls(events_redis, upload_id_of(location)) == [location]
    for host in ("evil.example", f"evil.example:{port}", f"localhost.evil.example:{port}"):
        assert (await send(server, "POST", "/files/", CREATION, host=host)).status == 400


async def test_a_proxys_forwarded_host_must_be_allowed_too(
    make_server: ServerFactory, events_redis: aioredis.Redis
) -> None:
    server = await make_server(behind_proxy=True, allowed_hosts=("uploads.example",))
    for forwarded in (
        [("X-Forwarded-Host", "evil.example")],
        [("Forwarded", "host=evil.example;proto=https")],
        [("X-Forwarded-Host", "uploads.example"), ("X-Forwarded-Prefix", "/a b")],
        [("X-Forwarded-Host", "uploads.example"), ("X-Forwarded-Proto", "javascript")],
    ):
        answer = await send(server, "POST", "/files/", [*CREATION, *forwarded])
        assert answer.status == 400, (forwarded, answer)
    headers = [*CREATION, ("X-Forwarded-Host", "uploads.example"), ("X-Forwarded-Proto", "https")]
    answer = await send(server, "POST", "/files/", headers, host="evil.example")
    assert answer.status == 201, answer
    location = answer.headers["location"]
    assert location.startswith("https://uploads.example/files/")
    assert await event_urls(events_redis, upload_id_of(location)) == [location]


async def test_with_a_public_url_the_host_header_plays_no_part(
    make_server: ServerFactory, http: aiohttp.ClientSession, events_redis: aioredis.Redis
) -> None:
    public = "https://uploads.example/tus/"
    server = await make_server(public_url=public, allowed_hosts=())
    answer = await send(server, "POST", "/files/", CREATION, host="evil.example")
    assert answer.status == 201, answer
    location = answer.headers["location"]
    assert location.startswith(public)
    upload_id = upload_id_of(location)
    assert await event_urls(events_redis, upload_id) == [location]
    stored = await server.uploads.get(upload_id, "anonymous")
    assert stored.url == location


def test_a_secured_server_needs_a_public_url_or_allowed_hosts() -> None:
    with pytest.raises(SettingError, match="--public-url or --allowed-hosts"):
        Settings(secrets=(SECRET,))
    Settings(secrets=(SECRET,), public_url="https://uploads.example/files/")
    Settings(secrets=(SECRET,), allowed_hosts=("uploads.example",))


def test_a_secured_tusserver_without_them_exits_with_one_line(tmp_path: Path) -> None:
    # The data dir lies under a plain file: had the setting been accepted, the server would
    # fail at mkdir, before it could start a Redis or listen anywhere.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TUS_")}
    result = subprocess.run(
        [sys.executable, "-m", "tusserver", "--secret", SECRET, "--host", "127.0.0.1",
         "--port", "0", "--data-dir", str(blocker / "data")],
        capture_output=True, text=True, timeout=60, env=environ,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--public-url or --allowed-hosts" in lines[0], result.stderr


# -- 3: the server's own Expect handler ------------------------------------------------------

ODD_EXPECTATIONS: list[bytes] = [
    b"\xff\xfe",
    "\u00e9t\u00e9".encode(),
    b"200-ok",
    b"100-continue x",
]
EXPECT_IDS = ["latin-1", "utf-8", "200-ok", "100-continue x"]


def expect_targets(url: str) -> list[tuple[str, str]]:
    """A request on each route: tus (on the upload at `url`), health, the demo page, its
    static files."""
    static = min(STATIC_DIR.rglob("*.js"))  # a file the demo page serves
    return [
        ("POST", "/files/"),
        ("HEAD", path_of(url)),
        ("PATCH", path_of(url)),
        ("DELETE", path_of(url)),
        ("OPTIONS", "/files/"),
        ("GET", "/files/"),
        ("GET", "/health"),
        ("GET", "/"),
        ("GET", STATIC_PREFIX + static.relative_to(STATIC_DIR).as_posix()),
    ]


@pytest.mark.parametrize("expect", ODD_EXPECTATIONS, ids=EXPECT_IDS)
async def test_an_expectation_other_than_100_continue_is_417_on_every_route(
    server: Server, http: aiohttp.ClientSession, expect: bytes
) -> None:
    url = await create_upload(http, server.url, 3)
    for method, target in expect_targets(url):
        headers: Headers = [*TUS.items(), ("Upload-Offset", "0"), ("Expect", expect)]
        answer = await send(server, method, target, headers, b"abc" if method == "PATCH" else b"")
        assert answer.status == 417, (method, target, answer)
    assert await head_offset(http, url) == 0  # neither the PATCH nor the DELETE acted
    await assert_health(server)


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "/nope"), ("GET", "/files/a/b"), ("PUT", "/health"), ("PATCH", "/")],
)
async def test_an_expectation_not_in_utf_8_is_417_on_unknown_paths_and_methods(
    server: Server, method: str, target: str
) -> None:
    answer = await send(server, method, target, [*TUS.items(), ("Expect", b"caf\xe9")])
    assert answer.status == 417, answer


async def test_an_expectation_in_utf_8_is_417_on_unknown_paths_and_methods(
    server: Server,
) -> None:
    for method, target in (("GET", "/nope"), ("PUT", "/health")):
        answer = await send(server, method, target, [("Expect", "caf\u00e9".encode())])
        assert answer.status == 417, answer


# -- 3: signed tokens whose claims are out of range or not text --------------------------------


def signed_json(text: str, secret: str = SECRET) -> str:
    """A token over exactly this JSON text, signed as the server's tokens are (the payload's
    bytes are the test's: JSON escapes such as a lone surrogate stay as written)."""
    signer = URLSafeSerializer(secret, salt=TOKEN_SALT).make_signer()
    return signer.sign(base64_encode(text.encode())).decode("ascii")


NOW = int(time.time())
LATER = NOW + 10 * 365 * 86400  # however long the suite runs, these tokens are not expired
GOOD_CLAIMS = f'"act":["create","upload","read","delete"],"iat":{NOW}'
HOSTILE_PAYLOADS = {
    "exp 1e400 (infinite)": f'{{"sub":"a",{GOOD_CLAIMS},"exp":1e400}}',
    "exp NaN": f'{{"sub":"a",{GOOD_CLAIMS},"exp":NaN}}',
    "exp 10**30": f'{{"sub":"a",{GOOD_CLAIMS},"exp":{10**30}}}',
    "exp past year 9999": f'{{"sub":"a",{GOOD_CLAIMS},"exp":253402300800}}',
    "exp of 5000 digits": f'{{"sub":"a",{GOOD_CLAIMS},"exp":{"9" * 5000}}}',
    "exp negative": f'{{"sub":"a",{GOOD_CLAIMS},"exp":-1}}',
    "iat 10**30": f'{{"sub":"a","act":["create"],"iat":{10**30},"exp":{LATER}}}',
    "max 2**63": f'{{"sub":"a",{GOOD_CLAIMS},"exp":{LATER},"max":{2**63}}}',
    "max 1e400": f'{{"sub":"a",{GOOD_CLAIMS},"exp":{LATER},"max":1e400}}',
    "sub lone surrogate": f'{{"sub":"\\ud800",{GOOD_CLAIMS},"exp":{LATER}}}',
    "sub 257 characters": f'{{"sub":"{"s" * 257}",{GOOD_CLAIMS},"exp":{LATER}}}',
    "uid lone surrogate": f'{{"sub":"a",{GOOD_CLAIMS},"exp":{LATER},"uid":"\\udfff"}}',
    "md key lone surrogate": (
        f'{{"sub":"a",{GOOD_CLAIMS},"exp":{LATER},"md":{{"\\ud800":["x"]}}}}'
    ),
    "md value lone surrogate": (
        f'{{"sub":"a",{GOOD_CLAIMS},"exp":{LATER},"md":{{"k":["\\udc80"]}}}}'
    ),
}


@pytest.mark.parametrize("payload", HOSTILE_PAYLOADS.values(), ids=HOSTILE_PAYLOADS.keys())
async def test_a_signed_token_with_a_claim_out_of_range_or_not_text_is_401(
    make_server: ServerFactory, http: aiohttp.ClientSession, payload: str
) -> None:
    server = await make_server(secrets=(SECRET,))
    token = bearer(signed_json(payload))
    async with http.post(server.url, headers={**TUS, "Upload-Length": "1", **token}) as response:
        assert response.status == 401, await response.text()
        assert (await response.text()).startswith("token payload is invalid")
    async with http.get(server.url, headers=token) as response:
        assert response.status == 401
    await assert_nothing_created(server, owner="a")


BOUNDARY_PAYLOADS = {
    "exp at year 9999": f'{{"sub":"a",{GOOD_CLAIMS},"exp":253402300799}}',
    "max 2**63-1": f'{{"sub":"a",{GOOD_CLAIMS},"exp":{LATER},"max":{2**63 - 1}}}',
    "sub 256 characters": f'{{"sub":"{"s" * 256}",{GOOD_CLAIMS},"exp":{LATER}}}',
    "sub astral": f'{{"sub":"\\ud83d\\ude00",{GOOD_CLAIMS},"exp":{LATER}}}',
}


@pytest.mark.parametrize("payload", BOUNDARY_PAYLOADS.values(), ids=BOUNDARY_PAYLOADS.keys())
async def test_a_signed_token_at_the_edge_of_each_range_is_accepted(
    make_server: ServerFactory, http: aiohttp.ClientSession, payload: str
) -> None:
    server = await make_server(secrets=(SECRET,))
    token = bearer(signed_json(payload))
    location = await create_upload(http, server.url, 3, **token)
    assert (await patch(http, location, 0, b"abc", **token)).status == 204
    async with http.get(server.url, headers=token) as response:
        assert response.status == 200
        assert [u["id"] for u in (await response.json())["uploads"]] == [upload_id_of(location)]


# -- 4: parse errors are logged in one line, and the access log survives them -----------------

MALFORMED_REQUESTS = {
    "bad Content-Length": b"POST /files/ HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n",
    "two Content-Lengths": (
        b"POST /files/ HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
    ),
    "non-ASCII in the target": "GET /files/?limit=\u0661 HTTP/1.1\r\nHost: h\r\n\r\n".encode(),
    "control byte in a header": b"GET /health HTTP/1.1\r\nHost: h\r\nX-A: a\x01b\r\n\r\n",
    "space before the colon": b"GET /health HTTP/1.1\r\nHost : h\r\n\r\n",
    "bad method": b"G(T /health HTTP/1.1\r\nHost: h\r\n\r\n",  # logged at debug level
    "bad version": b"GET /health HTTP/9.Z\r\nHost: h\r\n\r\n",
    "chunked and Content-Length": (
        b"POST /files/ HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 3\r\n\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("data", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
async def test_a_malformed_request_is_400_with_one_log_record_and_its_access_line(
    server: Server, caplog: pytest.LogCaptureFixture, data: bytes
) -> None:
    """The access logger read the route of requests that never had one and raised (each
    one's line lost, a traceback instead); aiohttp logged a traceback for each of them.
    (At the server's level, INFO: aiohttp logs a bad method, the mark of a non-HTTP client,
    at debug level.)"""
    caplog.set_level(logging.INFO)
    answer = await exchange(server.url, data)
    assert answer.status == 400, answer
    await assert_health(server)

    def access_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]

    assert any(" 400 " in line for line in access_lines()), access_lines()
    refusals = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    expected = [] if data.startswith(b"G(T") else ["refused a malformed request"]
    assert [message.split(":", 1)[0] for message in refusals] == expected, refusals
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR] == []


async def test_a_malformed_request_is_logged_on_one_line(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.server")
    answer = await exchange(server.url, MALFORMED_REQUESTS["non-ASCII in the target"])
    assert answer.status == 400
    messages = [r.getMessage() for r in caplog.records if r.name == "aiohttp.server"]
    assert len(messages) == 1 and "\n" not in messages[0], messages


# -- 5: conflicting duplicate tus headers ---------------------------------------------------

CONFLICTING = {
    "Tus-Resumable": ("1.0.0", "0.2.2"),
    "Upload-Offset": ("0", "3"),
    "Upload-Length": ("5", "500"),
    "Upload-Defer-Length": ("1", "0"),
    "Upload-Metadata": ("name YQ==", "name Yg=="),
    "Upload-Concat": ("partial", "final;/files/" + "a" * 32),
    "Upload-Checksum": ("sha1 Kq5sNclPz7QV2+lfQIuc6R7oRu0=", "md5 kAFQmDzST7DWlj99KOF/cg=="),
    "Content-Type": (OFFSET_STREAM, "text/plain"),
    "Content-Encoding": ("identity", "gzip"),
    "X-HTTP-Method-Override": ("PATCH", "DELETE"),
}


def test_every_single_value_header_has_a_conflict_case() -> None:
    assert sorted(CONFLICTING) == sorted(SINGLE_VALUE_HEADERS)


@pytest.mark.parametrize("name", sorted(CONFLICTING))
async def test_a_tus_header_sent_twice_with_different_values_is_400(
    server: Server, http: aiohttp.ClientSession, name: str
) -> None:
    first, second = CONFLICTING[name]
    base = [(key, value) for key, value in CREATION if key != name]
    answer = await send(server, "POST", "/files/", [*base, (name, first), (name, second)])
    assert answer.status == 400, answer
    assert name.encode() in answer.body
    await assert_nothing_created(server)
    url = await create_upload(http, server.url, 3)
    patch_base = [*TUS.items(), ("Upload-Offset", "0"), ("Content-Type", OFFSET_STREAM)]
    patch_base = [(key, value) for key, value in patch_base if key != name]
    headers = [*patch_base, (name, first), (name, second)]
    answer = await send(server, "PATCH", path_of(url), headers, b"abc")
    assert answer.status == 400, answer
    assert await head_offset(http, url) == 0  # nothing of the body was kept
    assert file_of(server.settings.data_dir, url).read_bytes() == b""


async def test_a_tus_header_repeated_with_the_same_value_is_accepted(
    server: Server, http: aiohttp.ClientSession
) -> None:
    answer = await send(server, "POST", "/files/", [*CREATION, ("Upload-Length", "5")])
    assert answer.status == 201, answer
    url = answer.headers["location"]
    headers = [*TUS.items(), ("Upload-Offset", "0"), ("Upload-Offset", "0"),
               ("Content-Type", OFFSET_STREAM)]  # fmt: skip
    answer = await send(server, "PATCH", path_of(url), headers, b"abc")
    assert answer.status == 204, answer
    assert await head_offset(http, url) == 3


# -- 6: a creation body of known size that cannot fit is refused before anything exists -------


@pytest.mark.parametrize(
    ("settings", "headers"),
    [
        ({"max_size_bytes": 4}, {"Upload-Defer-Length": "1"}),
        ({}, {"Upload-Length": "3"}),
    ],
    ids=["deferred, past --max-size", "past Upload-Length"],
)
async def test_a_creation_body_too_large_is_413_and_creates_nothing(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    settings: dict[str, int],
    headers: dict[str, str],
) -> None:
    server = await make_server(**settings)
    sent = {**TUS, **headers, "Content-Type": OFFSET_STREAM}
    async with http.post(server.url, data=b"hello", headers=sent) as response:
        assert response.status == 413
        assert "Location" not in response.headers
    await assert_nothing_created(server)
