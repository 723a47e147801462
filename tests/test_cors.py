"""CORS, the outermost middleware: preflights for every tus method and request header, every
tus response header exposed, the same headers on refusals and server errors, any origin in
development mode, only the configured ones when secured, credentials only for those."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support.servers import Server, ServerFactory
from tests.support.tus import OFFSET_STREAM, TUS, create_upload, patch_headers
from tests.support.waiting import wait_until
from tusserver.auth import issue_token
from tusserver.http.app import build_app
from tusserver.settings import Settings, build_settings
from tusserver.store.embedded import EmbeddedRedis

APP = "http://localhost:5173"  # a page on the developer's machine (dev mode allows loopback)
OTHER = "https://evil.example"
TUS_METHODS = ("POST", "HEAD", "PATCH", "DELETE", "GET")
TUS_REQUEST_HEADERS = (
    "Tus-Resumable", "Upload-Length", "Upload-Offset", "Upload-Metadata", "Upload-Defer-Length",
    "Upload-Concat", "Upload-Checksum", "Authorization", "X-HTTP-Method-Override",
    "X-Requested-With", "Content-Type",
)  # fmt: skip
TUS_RESPONSE_HEADERS = (
    "Location", "Upload-Offset", "Upload-Length", "Upload-Metadata", "Upload-Defer-Length",
    "Upload-Expires", "Upload-Concat", "Repr-Digest", "Tus-Resumable", "Tus-Version",
    "Tus-Extension", "Tus-Max-Size", "Tus-Checksum-Algorithm",
)  # fmt: skip
# Headers a browser shows to scripts without being exposed, and those about the connection.
SAFELISTED = {
    "cache-control", "content-language", "content-length", "content-type", "expires",
    "last-modified", "pragma", "date", "server", "connection", "keep-alive", "vary",
    "transfer-encoding", "accept-ranges", "x-content-type-options",
}  # fmt: skip


def listed(value: str | None) -> set[str]:
    return {part.strip().lower() for part in (value or "").split(",") if part.strip()}


def preflight(method: str, origin: str = APP, headers: str = "") -> dict[str, str]:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        sent["Access-Control-Request-Headers"] = headers
    return sent


def assert_cors(headers: Mapping[str, str], origin: str = APP) -> None:
    """The answer lets a page of `origin` read it, with every non-simple header exposed."""
    assert headers.get("Access-Control-Allow-Origin") == origin
    assert "origin" in listed(headers.get("Vary"))
    exposed = listed(headers.get("Access-Control-Expose-Headers"))
    unexposed = {
        name.lower() for name in headers
        if name.lower() not in SAFELISTED and not name.lower().startswith("access-control-")
    } - exposed  # fmt: skip
    assert unexposed == set(), f"not in Access-Control-Expose-Headers: {unexposed}"


def assert_no_cors(headers: Mapping[str, str]) -> None:
    assert not [name for name in headers if name.lower().startswith("access-control-")]


def token(*actions: str, subject: str = "alice") -> str:
    return issue_token("cors-secret", subject=subject, actions=actions, ttl_s=600)


# -- preflights ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", TUS_METHODS)
async def test_preflight_allows_every_tus_method_and_request_header(
    server: Server, http: aiohttp.ClientSession, method: str
) -> None:
    upload_url = await create_upload(http, server.url, 10)
    for url in (server.url, upload_url):
        sent = preflight(method, headers=", ".join(h.lower() for h in TUS_REQUEST_HEADERS))
        async with http.options(url, headers=sent) as response:
            assert response.status in (200, 204)
            assert response.headers["Access-Control-Allow-Origin"] == APP
            assert method.lower() in listed(response.headers["Access-Control-Allow-Methods"])
            allowed = listed(response.headers["Access-Control-Allow-Headers"])
            assert {h.lower() for h in TUS_REQUEST_HEADERS} <= allowed
            assert int(response.headers["Access-Control-Max-Age"]) >= 600
            assert "Access-Control-Allow-Credentials" not in response.headers  # any origin


async def test_preflight_is_answered_without_a_token_in_secured_mode(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("cors-secret",), cors_origins=(APP,))
    sent = preflight("POST", headers="authorization, tus-resumable, upload-length")
    async with http.options(server.url, headers=sent) as response:
        assert response.status in (200, 204)
        assert response.headers["Access-Control-Allow-Origin"] == APP
        assert response.headers["Access-Control-Allow-Credentials"] == "true"


# -- answers -----------------------------------------------------------------------------


async def test_every_tus_answer_exposes_its_headers(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_size_bytes=2**30)
    origin = {"Origin": APP}
    async with http.options(server.url, headers={**origin, **TUS}) as response:
        assert_cors(response.headers)
        assert {"tus-version", "tus-extension", "tus-max-size"} <= listed(
            response.headers["Access-Control-Expose-Headers"]
        )
    created = {**origin, **TUS, "Upload-Length": "3", "Upload-Metadata": "filename YS50eHQ="}
    async with http.post(server.url, headers=created) as response:
        assert response.status == 201
        assert_cors(response.headers)
        url = response.headers["Location"]
    patch = patch_headers(0, **origin, **{"Upload-Checksum": "sha1 " + sha1_b64(b"abc")})
    async with http.patch(url, data=b"abc", headers=patch) as response:
        assert response.status == 204
        assert_cors(response.headers)

    async def has_digest() -> bool:
        async with http.head(url, headers=TUS) as response:
            return "Repr-Digest" in response.headers

    await wait_until(has_digest)
    async with http.head(url, headers={**origin, **TUS}) as response:
        assert_cors(response.headers)
        assert "repr-digest" in listed(response.headers["Access-Control-Expose-Headers"])
    async with http.get(url, headers=origin) as response:
        assert response.status == 200
        assert_cors(response.headers)
    async with http.get(url, headers={**origin, "Range": "bytes=1-"}) as response:
        assert response.status == 206
        assert_cors(response.headers)
    async with http.delete(url, headers={**origin, **TUS}) as response:
        assert response.status == 204
        assert_cors(response.headers)
    deferred = {**origin, **TUS, "Upload-Defer-Length": "1"}
    async with http.post(server.url, headers=deferred) as response:
        deferred_url = response.headers["Location"]
    async with http.head(deferred_url, headers={**origin, **TUS}) as response:
        assert response.headers["Upload-Defer-Length"] == "1"
        assert_cors(response.headers)
    exposed = listed(response.headers["Access-Control-Expose-Headers"])
    assert {h.lower() for h in TUS_RESPONSE_HEADERS} <= exposed


def sha1_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha1(data).digest()).decode()  # noqa: S324 (tus checksum)


async def test_refusals_carry_cors_too(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_size_bytes=100)
    origin = {"Origin": APP}
    url = await create_upload(http, server.url, 10)
    answers = {
        412: http.post(server.url, headers={**origin, "Tus-Resumable": "0.2.2"}),
        409: http.patch(url, data=b"x", headers=patch_headers(5, **origin)),
        404: http.head(server.url + "0" * 32, headers={**origin, **TUS}),
        413: http.post(server.url, headers={**origin, **TUS, "Upload-Length": "101"}),
        415: http.patch(url, data=b"x", headers={**origin, **TUS, "Upload-Offset": "0"}),
        460: http.patch(
            url, data=b"abc",
            headers=patch_headers(0, **origin, **{"Upload-Checksum": "sha1 " + sha1_b64(b"x")}),
        ),
        400: http.post(server.url, headers={**origin, **TUS, "Upload-Length": "-1"}),
    }  # fmt: skip
    for status, request in answers.items():
        async with request as response:
            assert response.status == status, await response.text()
            assert_cors(response.headers)
            assert response.headers["Tus-Resumable"] == "1.0.0"
    async with http.get(server.root + "/no/such/path", headers=origin) as response:
        assert response.status == 404
        assert response.headers["Access-Control-Allow-Origin"] == APP


async def test_token_refusals_carry_cors_for_a_configured_origin(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("cors-secret",), cors_origins=(APP,))
    origin = {"Origin": APP}
    async with http.post(server.url, headers={**origin, **TUS, "Upload-Length": "1"}) as response:
        assert response.status == 401
        assert_cors(response.headers)
    read_only = {"Authorization": f"Bearer {token('read')}"}
    async with http.post(
        server.url, headers={**origin, **TUS, **read_only, "Upload-Length": "1"}
    ) as response:
        assert response.status == 403
        assert_cors(response.headers)


async def test_insufficient_storage_carries_cors(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(min_free_disk_bytes=2**62)
    headers = {"Origin": APP, **TUS, "Upload-Length": "10"}
    async with http.post(server.url, headers=headers) as response:
        assert response.status == 507
        assert_cors(response.headers)


@pytest.fixture
async def server_losing_redis(tmp_path: Path) -> AsyncIterator[tuple[str, EmbeddedRedis]]:
    """A server on its own embedded Valkey, which the test may stop."""
    redis_server = EmbeddedRedis(tmp_path / "redis")
    redis_url = redis_server.start()
    settings = Settings(data_dir=tmp_path / "data", port=0)
    runner = web.AppRunner(build_app(settings, redis_url), handle_signals=False)
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/files/", redis_server
    finally:
        await runner.cleanup()
        redis_server.stop()


async def test_server_errors_carry_cors(
    server_losing_redis: tuple[str, EmbeddedRedis], http: aiohttp.ClientSession
) -> None:
    url, redis_server = server_losing_redis
    redis_server.stop()
    headers = {"Origin": APP, **TUS, "Upload-Length": "5"}
    async with http.post(url, headers=headers) as response:
        assert response.status == 503
        assert_cors(response.headers)


async def test_the_demo_page_and_health_carry_cors(
    server: Server, http: aiohttp.ClientSession
) -> None:
    for path in ("/", "/health", "/static/demo.js"):
        async with http.get(server.root + path, headers={"Origin": APP}) as response:
            assert response.status == 200, path
            assert response.headers["Access-Control-Allow-Origin"] == APP


# -- which origins -------------------------------------------------------------------------


async def test_development_mode_allows_loopback_origins_only_without_credentials(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """Without a secret nothing asks for a token, so a page from anywhere else must not be
    able to read a developer's uploads: only pages served from this machine get CORS."""
    sent = {**TUS, "Upload-Length": "1"}
    for origin in (APP, "http://127.0.0.1:3000", "http://[::1]:8080", "https://localhost"):
        async with http.post(server.url, headers={"Origin": origin, **sent}) as response:
            assert response.headers["Access-Control-Allow-Origin"] == origin
            assert "Access-Control-Allow-Credentials" not in response.headers
    for origin in (OTHER, "https://app.example", "null", "http://localhost.evil.example"):
        async with http.post(server.url, headers={"Origin": origin, **sent}) as response:
            assert response.status == 201  # CORS is the browser's gate, not an access check
            assert_no_cors(response.headers)
        async with http.options(server.url, headers=preflight("POST", origin)) as response:
            assert_no_cors(response.headers)


async def test_no_origin_no_cors_headers(server: Server, http: aiohttp.ClientSession) -> None:
    async with http.post(server.url, headers={**TUS, "Upload-Length": "1"}) as response:
        assert response.status == 201
        assert_no_cors(response.headers)


async def test_secured_mode_allows_only_the_configured_origins_with_credentials(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(
        secrets=("cors-secret",), cors_origins=(APP, "http://localhost:8080")
    )
    allowed = {"Authorization": f"Bearer {token('create')}", **TUS, "Upload-Length": "1"}
    for origin in (APP, "http://localhost:8080"):
        async with http.post(server.url, headers={"Origin": origin, **allowed}) as response:
            assert response.status == 201
            assert_cors(response.headers, origin)
            assert response.headers["Access-Control-Allow-Credentials"] == "true"
    for origin in (OTHER, APP + ":8443", "http://app.example", "null"):
        async with http.post(server.url, headers={"Origin": origin, **allowed}) as response:
            assert_no_cors(response.headers)
        async with http.options(server.url, headers=preflight("POST", origin)) as response:
            assert_no_cors(response.headers)


async def test_secured_mode_without_configured_origins_allows_none(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("cors-secret",))
    async with http.options(server.url, headers=preflight("POST")) as response:
        assert_no_cors(response.headers)
    async with http.post(server.url, headers={"Origin": APP, **TUS}) as response:
        assert response.status == 401
        assert_no_cors(response.headers)


async def test_development_mode_with_configured_origins_allows_only_those(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(cors_origins=(APP,))
    sent = {**TUS, "Upload-Length": "1"}
    async with http.post(server.url, headers={"Origin": APP, **sent}) as response:
        assert_cors(response.headers)
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
    async with http.post(server.url, headers={"Origin": OTHER, **sent}) as response:
        assert response.status == 201  # CORS is the browser's gate, not an access check
        assert_no_cors(response.headers)


async def test_a_wildcard_allows_any_origin_but_never_credentials(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("cors-secret",), cors_origins=("*",))
    async with http.options(server.url, headers=preflight("PATCH", OTHER)) as response:
        assert response.headers["Access-Control-Allow-Origin"] == OTHER
        assert "Access-Control-Allow-Credentials" not in response.headers


def test_cors_origins_setting_is_a_comma_separated_list(tmp_path: Path) -> None:
    settings = build_settings(
        {"cors_origins": " https://a.example/ ,http://localhost:3000"},
        {"TUS_DATA_DIR": str(tmp_path)},
    )
    assert settings.cors_origins == ("https://a.example", "http://localhost:3000")
    from_env = build_settings({}, {"TUS_CORS_ORIGINS": "https://b.example"})
    assert from_env.cors_origins == ("https://b.example",)


async def test_a_method_override_passes_through_a_preflight(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """A page hides PATCH in POST (X-HTTP-Method-Override): the preflight allows the header and
    the real request is answered with CORS as a PATCH."""
    url = await create_upload(http, server.url, 3)
    async with http.options(url, headers=preflight("POST", headers="x-http-method-override")) as r:
        assert "x-http-method-override" in listed(r.headers["Access-Control-Allow-Headers"])
    sent = {"Origin": APP, **TUS, "X-HTTP-Method-Override": "PATCH", "Upload-Offset": "0",
            "Content-Type": OFFSET_STREAM}  # fmt: skip
    async with http.post(url, data=b"abc", headers=sent) as response:
        assert response.status == 204
        assert response.headers["Upload-Offset"] == "3"
        assert_cors(response.headers)


# -- the resumable-upload draft --------------------------------------------------------------

DRAFT_REQUEST_HEADERS = ("Upload-Complete", "Upload-Incomplete", "Upload-Draft-Interop-Version",
                         "Content-Digest", "Repr-Digest", "Content-Disposition")  # fmt: skip
DRAFT_RESPONSE_HEADERS = ("Upload-Complete", "Upload-Incomplete", "Upload-Limit",
                          "Upload-Draft-Interop-Version", "Accept-Patch")  # fmt: skip


async def test_draft_requests_pass_preflights_and_expose_their_answers(
    server: Server, http: aiohttp.ClientSession
) -> None:
    sent = preflight("POST", headers=", ".join(h.lower() for h in DRAFT_REQUEST_HEADERS))
    async with http.options(server.url, headers=sent) as response:
        assert response.status in (200, 204)
        allowed = listed(response.headers["Access-Control-Allow-Headers"])
        assert {h.lower() for h in DRAFT_REQUEST_HEADERS} <= allowed
    created = {"Origin": APP, "Upload-Complete": "?0", "Upload-Draft-Interop-Version": "6"}
    async with http.post(server.url, headers=created) as response:
        assert response.status == 201
        assert response.headers["Upload-Complete"] == "?0"
        assert_cors(response.headers)
        exposed = listed(response.headers["Access-Control-Expose-Headers"])
        assert {h.lower() for h in DRAFT_RESPONSE_HEADERS} <= exposed
