"""Issue 18, "Hostile input": a test for each defect the issue lists, against real servers,
with requests written byte by byte on plain sockets where an HTTP client would tidy them up
(a Host with a space, an Expect header in Latin-1, a header sent twice).

Defect 1 (connection limits, memory) is tests/test_connection_limits.py; the Host header
(defects 3 and 7) tests/test_upload_hosts.py; the orphan sweep tests/test_orphan_sweep.py; the
bounded fuzz tests/test_hostile_fuzz.py. Defects 6, 8 and 9 already have their tests:
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
import time
import zlib
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import pytest
from itsdangerous import URLSafeSerializer, base64_encode

from tests.support.files import file_of
from tests.support.processes import StartProcess, start_server
from tests.support.raw_http import RawRequest, exchange, request_bytes
from tests.support.servers import Server, ServerFactory, assert_no_uploads, send_raw
from tests.support.tus import (
    OFFSET_STREAM,
    TUS,
    bearer,
    create_upload,
    head_offset,
    patch,
    path_of,
    upload_id_of,
)
from tests.support.waiting import wait_until
from tusserver.auth import TOKEN_SALT
from tusserver.http.demo import STATIC_DIR, STATIC_PREFIX
from tusserver.protocol import SINGLE_VALUE_HEADERS

SECRET = "hostile-input-secret"
Headers = Iterable[tuple[str | bytes, str | bytes]]


async def assert_health(server: Server) -> None:
    """The server still answers a plain request."""
    assert (await send_raw(server, "GET", "/health")).status == 200


CREATION = [*TUS.items(), ("Upload-Length", "5")]


# -- 2: a compressed body is refused, not decompressed and cut ------------------------------


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "gzip, identity", "x-unknown"])
async def test_a_patch_with_a_content_encoding_is_refused_and_keeps_nothing(
    server: Server, http: aiohttp.ClientSession, encoding: str
) -> None:
    """aiohttp decompressed a gzip body and cut it at Content-Length: 204, wrong bytes."""
    data = os.urandom(2000)
    body = zlib.compress(data) if encoding == "deflate" else gzip.compress(data)
    url = await create_upload(http, server.url, len(data))
    response = await patch(http, url, 0, body, **{"Content-Encoding": encoding})
    assert response.status == 415
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
    await assert_no_uploads(server)


@pytest.mark.parametrize(
    ("method", "target", "headers"),
    [
        ("PATCH", "/files/" + "0" * 32, [("Upload-Offset", "0"), ("Content-Type", OFFSET_STREAM)]),
        ("POST", "/files/", [("Upload-Length", "16"), ("Content-Type", OFFSET_STREAM)]),
        ("GET", "/health", []),
    ],
    ids=["PATCH", "creation", "health"],
)
async def test_a_body_in_an_encoding_it_cannot_decode_is_answered_without_a_traceback(
    server: Server,
    caplog: pytest.LogCaptureFixture,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
) -> None:
    """Found by the fuzz (tests/test_hostile_fuzz.py): one log flood for anybody, no token
    needed."""
    caplog.set_level(logging.INFO)
    sent = [*TUS.items(), *headers, ("Content-Encoding", "gzip")]
    answer = await send_raw(server, method, target, sent, b"this is not gzip")
    assert answer.status in (200, 404, 415), answer
    await assert_health(server)  # after the answer above: its connection was dealt with
    assert [
        r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR
    ] == []


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) process `pid` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gzip_of_zeros(gib: int) -> bytes:
    """The start of a gzip stream of `gib` GiB of zeros, about 1 MiB a GiB (no trailer: a
    decoder does all the work before it would check one). Built from one 16 MiB segment
    flushed so that every following segment compresses to the same bytes."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(16 * 2**20)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + again * (gib * 64 - 1)


async def test_a_compressed_body_costs_the_server_no_decoding(
    processes: StartProcess, tmp_path: Path
) -> None:
    """1 MiB of gzip that decodes to 1 GiB, sent to /health (no token needed anywhere): a
    server that refuses encodings instead of decoding them spends milliseconds on it, one
    that decodes it seconds (2.5 s a GiB on the machine this was written on). CPU time, not
    wall-clock time: how busy the machine is does not change it."""
    server = await start_server(processes, tmp_path / "data")
    pid, host = server.process.pid, server.url.split("/")[2]
    bomb = gzip_of_zeros(1)
    headers = [("Host", host), ("Content-Encoding", "gzip"), ("Content-Length", str(len(bomb)))]
    before = cpu_seconds(pid)
    request = await RawRequest.connect(server.url)
    try:
        await request.send(request_bytes("GET", "/health", headers, bomb))
        assert (await request.response(timeout_s=60)).status == 200
        await wait_until(request.is_read_or_closed_by_server, 60, what="the server read it all")
    finally:
        await request.close()
    health = request_bytes("GET", "/health", [("Host", host)])
    assert (await exchange(server.url, health, timeout_s=60)).status == 200  # its loop is free
    assert cpu_seconds(pid) - before < 0.5


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
    answer = await send_raw(server, "GET", f"/files/?limit={limit}", TUS.items())
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
    answer = await send_raw(server, "GET", f"/files/?cursor={cursor}", TUS.items())
    assert answer.status == 400, answer
    assert b"cursor" in answer.body


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
        body = b"abc" if method == "PATCH" else b""
        answer = await send_raw(server, method, target, headers, body)
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
    answer = await send_raw(server, method, target, [*TUS.items(), ("Expect", b"caf\xe9")])
    assert answer.status == 417, answer


async def test_an_expectation_in_utf_8_is_417_on_unknown_paths_and_methods(
    server: Server,
) -> None:
    for method, target in (("GET", "/nope"), ("PUT", "/health")):
        answer = await send_raw(server, method, target, [("Expect", "caf\u00e9".encode())])
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
    await assert_no_uploads(server, owner="a")


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
    answer = await send_raw(server, "POST", "/files/", [*base, (name, first), (name, second)])
    assert answer.status == 400, answer
    assert name.encode() in answer.body
    await assert_no_uploads(server)
    url = await create_upload(http, server.url, 3)
    patch_base = [*TUS.items(), ("Upload-Offset", "0"), ("Content-Type", OFFSET_STREAM)]
    patch_base = [(key, value) for key, value in patch_base if key != name]
    headers = [*patch_base, (name, first), (name, second)]
    answer = await send_raw(server, "PATCH", path_of(url), headers, b"abc")
    assert answer.status == 400, answer
    assert await head_offset(http, url) == 0  # nothing of the body was kept
    assert file_of(server.settings.data_dir, url).read_bytes() == b""


async def test_a_tus_header_repeated_with_the_same_value_is_accepted(
    server: Server, http: aiohttp.ClientSession
) -> None:
    answer = await send_raw(server, "POST", "/files/", [*CREATION, ("Upload-Length", "5")])
    assert answer.status == 201, answer
    url = answer.headers["location"]
    headers = [*TUS.items(), ("Upload-Offset", "0"), ("Upload-Offset", "0"),
               ("Content-Type", OFFSET_STREAM)]  # fmt: skip
    answer = await send_raw(server, "PATCH", path_of(url), headers, b"abc")
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
    await assert_no_uploads(server)
