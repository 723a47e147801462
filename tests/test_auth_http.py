"""Signed tokens over HTTP: a secured tusserver refuses what a token does not allow, and a
refused request leaves the upload exactly as it was (offset in Redis, bytes on disk)."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.processes import ServerProcess
from tests.support.servers import Server, ServerFactory
from tests.support.tus import TUS, bearer, create_upload, head_offset, patch_headers, upload_id_of
from tests.support.waiting import wait_until
from tusserver.auth import ACTIONS, issue_token
from tusserver.http.access_log import AccessLogger, JsonAccessLogger
from tusserver.http.app import build_app, make_runner
from tusserver.settings import Settings

SECRET = "current-secret"
ALL = sorted(ACTIONS)


def token(
    subject: str = "alice",
    actions: Iterable[str] = ALL,
    *,
    secret: str = SECRET,
    ttl_s: float = 600,
    now: float | None = None,
    upload_id: str | None = None,
    max_size_bytes: int | None = None,
    metadata: Mapping[str, Sequence[str]] | None = None,
) -> str:
    return issue_token(
        secret, subject=subject, actions=actions, ttl_s=ttl_s, now=now, upload_id=upload_id,
        max_size_bytes=max_size_bytes, metadata=metadata,
    )  # fmt: skip


def metadata_header(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


@pytest.fixture
async def secured(make_server: ServerFactory) -> Server:
    return await make_server(secrets=(SECRET,))


async def started_upload(
    http: aiohttp.ClientSession, server: Server, data: bytes, length: int, subject: str = "alice"
) -> str:
    """An upload of `subject` with `data` committed (of `length` bytes in all)."""
    url = await create_upload(http, server.url, length, **bearer(token(subject)))
    if data:
        headers = patch_headers(0, **bearer(token(subject)))
        async with http.patch(url, data=data, headers=headers) as response:
            assert response.status == 204, await response.text()
    return url


async def completed_upload(
    http: aiohttp.ClientSession, server: Server, data: bytes, subject: str = "alice"
) -> str:
    url = await started_upload(http, server, data, len(data), subject)

    async def has_digest() -> bool:
        async with http.head(url, headers={**TUS, **bearer(token(subject))}) as response:
            return "Repr-Digest" in response.headers

    await wait_until(has_digest)
    return url


async def assert_unchanged(
    http: aiohttp.ClientSession, server: Server, url: str, data: bytes, subject: str = "alice"
) -> None:
    """The upload still has `data` committed, as its owner sees it and on disk."""
    assert await head_offset(http, url, **bearer(token(subject))) == len(data)
    assert server.file_of(url).read_bytes() == data


async def owned_ids(http: aiohttp.ClientSession, server: Server, subject: str) -> list[str]:
    async with http.get(server.url, headers=bearer(token(subject, ["read"]))) as response:
        assert response.status == 200, await response.text()
        listing: dict[str, Any] = await response.json()
    return [entry["id"] for entry in listing["uploads"]]


def upload_files(server: Server) -> list[Path]:
    return [p for p in (server.settings.data_dir / "uploads").rglob("*") if p.is_file()]


# -- 401: no token, or one that is not good ------------------------------------------------


async def test_patch_without_token_is_401_with_bearer_challenge(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    async with http.patch(url, data=b"def", headers=patch_headers(3)) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
        assert "token is required" in await response.text()
    await assert_unchanged(http, secured, url, b"abc")


async def test_post_without_token_is_401_and_creates_nothing(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    async with http.post(secured.url, headers={**TUS, "Upload-Length": "3"}) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
        assert "Location" not in response.headers
    assert await owned_ids(http, secured, "anonymous") == []
    assert upload_files(secured) == []


@pytest.mark.parametrize(
    "authorization",
    ["Basic abc", "Bearer", "Bearer ", "Bearer a b", "Token {token}", "Bearer {token} extra",
     "Bearer not-a-token", "{token}"],
)  # fmt: skip
async def test_malformed_authorization_is_401(
    secured: Server, http: aiohttp.ClientSession, authorization: str
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    headers = patch_headers(3, Authorization=authorization.format(token=token()))
    async with http.patch(url, data=b"def", headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    await assert_unchanged(http, secured, url, b"abc")


async def test_bearer_scheme_is_case_insensitive(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    headers = patch_headers(3, Authorization=f"bEARER {token()}")
    async with http.patch(url, data=b"def", headers=headers) as response:
        assert response.status == 204
    await assert_unchanged(http, secured, url, b"abcdef")


async def test_forged_signature_is_401_naming_the_signature(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    forged = token(secret="another-secret")
    async with http.patch(url, data=b"def", headers=patch_headers(3, **bearer(forged))) as response:
        assert response.status == 401
        assert "signature" in await response.text()
    await assert_unchanged(http, secured, url, b"abc")


async def test_tampered_payload_is_401(secured: Server, http: aiohttp.ClientSession) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    payload, signature = token("bob").split(".")
    # one base64url character changed: the payload no longer matches its signature
    swapped = "B" if payload[10] == "A" else "A"
    tampered = f"{payload[:10]}{swapped}{payload[11:]}.{signature}"
    headers = patch_headers(3, **bearer(tampered))
    async with http.patch(url, data=b"def", headers=headers) as response:
        assert response.status == 401
        assert "signature" in await response.text()
    await assert_unchanged(http, secured, url, b"abc")


async def test_expired_token_is_401_naming_expiry(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    expired = token(now=time.time() - 3600, ttl_s=60)
    async with http.patch(
        url, data=b"def", headers=patch_headers(3, **bearer(expired))
    ) as response:
        assert response.status == 401
        assert "expired" in await response.text()
    await assert_unchanged(http, secured, url, b"abc")


async def test_clock_skew_within_the_leeway_is_accepted(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    ahead = token(now=time.time() + 10)
    async with http.patch(url, data=b"def", headers=patch_headers(3, **bearer(ahead))) as response:
        assert response.status == 204
    await assert_unchanged(http, secured, url, b"abcdef")


async def test_token_issued_far_in_the_future_is_401(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    ahead = token(now=time.time() + 3600)
    async with http.patch(url, data=b"def", headers=patch_headers(3, **bearer(ahead))) as response:
        assert response.status == 401
        assert "future" in await response.text()
    await assert_unchanged(http, secured, url, b"abc")


# -- 403: the token does not allow the action ----------------------------------------------


async def test_patch_with_read_only_token_is_403(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    headers = patch_headers(3, **bearer(token(actions=["read"])))
    async with http.patch(url, data=b"def", headers=headers) as response:
        assert response.status == 403
        assert "upload" in await response.text()
    await assert_unchanged(http, secured, url, b"abc")


async def test_post_needs_create(secured: Server, http: aiohttp.ClientSession) -> None:
    no_create = bearer(token(actions=["upload", "read", "delete"]))
    headers = {**TUS, "Upload-Length": "3", "Content-Type": "application/offset+octet-stream"}
    async with http.post(secured.url, data=b"abc", headers={**headers, **no_create}) as response:
        assert response.status == 403
        assert "create" in await response.text()
    assert await owned_ids(http, secured, "alice") == []
    assert upload_files(secured) == []
    url = await create_upload(http, secured.url, 3, **bearer(token(actions=["create"])))
    assert await owned_ids(http, secured, "alice") == [upload_id_of(url)]


async def test_delete_needs_delete(secured: Server, http: aiohttp.ClientSession) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    headers = {**TUS, **bearer(token(actions=["create", "upload", "read"]))}
    async with http.delete(url, headers=headers) as response:
        assert response.status == 403
        assert "delete" in await response.text()
    await assert_unchanged(http, secured, url, b"abc")
    async with http.delete(url, headers={**TUS, **bearer(token(actions=["delete"]))}) as response:
        assert response.status == 204
    async with http.head(url, headers={**TUS, **bearer(token())}) as response:
        assert response.status == 404  # --gone-status, 404 by default
    assert not secured.file_of(url).exists()


@pytest.mark.parametrize(
    ("actions", "status"),
    [(["upload"], 200), (["read"], 200), (["create", "delete"], 403)],
)
async def test_head_needs_upload_or_read(
    secured: Server, http: aiohttp.ClientSession, actions: list[str], status: int
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    async with http.head(url, headers={**TUS, **bearer(token(actions=actions))}) as response:
        assert response.status == status
        if status == 200:
            assert response.headers["Upload-Offset"] == "3"
        else:
            assert "Upload-Offset" not in response.headers
    await assert_unchanged(http, secured, url, b"abc")


# -- 404: another subject's upload, or an upload the token does not name -------------------


async def not_found_body(http: aiohttp.ClientSession, server: Server, who: str) -> str:
    """What a HEAD-less refusal of an upload id that never existed says."""
    async with http.get(server.url + "no-such-upload", headers={**TUS, **bearer(who)}) as response:
        assert response.status == 404
        return await response.text()


async def refusals(
    http: aiohttp.ClientSession, url: str, offset: int, who: str
) -> list[tuple[str, int, str]]:
    """Send HEAD, PATCH, GET and DELETE for `url` with the token `who`: (method, status, body)."""
    auth = {**TUS, **bearer(who)}
    answers = []
    async with http.head(url, headers=auth) as response:
        answers.append(("HEAD", response.status, ""))
    async with http.patch(
        url, data=b"xyz", headers=patch_headers(offset, **bearer(who))
    ) as response:
        answers.append(("PATCH", response.status, await response.text()))
    async with http.get(url, headers=auth) as response:
        answers.append(("GET", response.status, await response.text()))
    async with http.delete(url, headers=auth) as response:
        answers.append(("DELETE", response.status, await response.text()))
    return answers


async def test_another_subjects_upload_is_404_never_403(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    partial = await started_upload(http, secured, b"abc", 6)
    done = await completed_upload(http, secured, b"finished")
    bob = token("bob")
    unknown = await not_found_body(http, secured, bob)
    for url, offset in ((partial, 3), (done, 8)):
        for method, status, body in await refusals(http, url, offset, bob):
            assert status == 404, method
            if method != "HEAD":
                assert body == unknown, method  # indistinguishable from an id that never was
    await assert_unchanged(http, secured, partial, b"abc")
    await assert_unchanged(http, secured, done, b"finished")
    async with http.get(done, headers=bearer(token())) as response:
        assert response.status == 200
        assert await response.read() == b"finished"


@pytest.mark.parametrize("gone_status", [404, 410])
async def test_another_subjects_terminated_upload_is_404_without_the_reason(
    make_server: ServerFactory, http: aiohttp.ClientSession, gone_status: int
) -> None:
    secured = await make_server(secrets=(SECRET,), gone_status=gone_status)
    url = await started_upload(http, secured, b"abc", 6)
    async with http.delete(url, headers={**TUS, **bearer(token())}) as response:
        assert response.status == 204
    async with http.delete(url, headers={**TUS, **bearer(token())}) as response:
        assert response.status == gone_status  # its owner learns it is gone, and why
        assert await response.text() == "this upload was terminated\n"
    async with http.head(url, headers={**TUS, **bearer(token("bob"))}) as response:
        assert response.status == 404
    async with http.delete(url, headers={**TUS, **bearer(token("bob"))}) as response:
        assert response.status == 404
        assert await response.text() == "no such upload\n"


async def test_token_for_another_upload_id_is_404(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    partial = await started_upload(http, secured, b"abc", 6)
    done = await completed_upload(http, secured, b"finished")
    elsewhere = token(upload_id="some-other-upload")
    for url, offset in ((partial, 3), (done, 8)):
        for method, status, _body in await refusals(http, url, offset, elsewhere):
            assert status == 404, method
    await assert_unchanged(http, secured, partial, b"abc")
    await assert_unchanged(http, secured, done, b"finished")
    # the same token naming the upload itself is good for it
    named = token(upload_id=upload_id_of(partial))
    async with http.patch(partial, data=b"def", headers=patch_headers(3, **bearer(named))) as r:
        assert r.status == 204
    await assert_unchanged(http, secured, partial, b"abcdef")


# -- 413: past the token's maximum size ----------------------------------------------------


async def test_upload_length_over_the_tokens_max_is_413(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    limited = bearer(token(max_size_bytes=10))
    async with http.post(secured.url, headers={**TUS, "Upload-Length": "11", **limited}) as r:
        assert r.status == 413
        assert "10" in await r.text()
    assert await owned_ids(http, secured, "alice") == []
    assert upload_files(secured) == []
    url = await create_upload(http, secured.url, 10, **limited)
    assert await owned_ids(http, secured, "alice") == [upload_id_of(url)]


async def test_deferred_length_upload_running_past_the_tokens_max_is_413(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    limited = bearer(token(max_size_bytes=10))
    deferred = {**TUS, "Upload-Defer-Length": "1", **limited}
    async with http.post(secured.url, headers=deferred) as response:
        assert response.status == 201
        url = response.headers["Location"]
    async with http.patch(url, data=b"abcdef", headers=patch_headers(0, **limited)) as response:
        assert response.status == 204
    async with http.patch(url, data=b"ghijk", headers=patch_headers(6, **limited)) as response:
        assert response.status == 413
    await assert_unchanged(http, secured, url, b"abcdef")
    # declaring a length past the limit is refused too
    declare = patch_headers(6, **limited, **{"Upload-Length": "11"})
    async with http.patch(url, data=b"ghijk", headers=declare) as response:
        assert response.status == 413
    await assert_unchanged(http, secured, url, b"abcdef")
    async with http.head(url, headers={**TUS, **limited}) as response:
        assert response.headers.get("Upload-Defer-Length") == "1"
    async with http.patch(url, data=b"ghij", headers=patch_headers(6, **limited)) as response:
        assert response.status == 204
    await assert_unchanged(http, secured, url, b"abcdefghij")


async def test_deferred_length_413_past_a_write_block_leaves_the_file_as_it_was(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    limited = bearer(token(max_size_bytes=5 * 2**20))
    deferred = {**TUS, "Upload-Defer-Length": "1", **limited}
    async with http.post(secured.url, headers=deferred) as response:
        assert response.status == 201
        url = response.headers["Location"]
    async with http.patch(url, data=b"abc", headers=patch_headers(0, **limited)) as response:
        assert response.status == 204
    body = io.BytesIO(b"x" * (9 * 2**20))  # more than one write block, past the limit
    async with http.patch(url, data=body, headers=patch_headers(3, **limited)) as response:
        assert response.status == 413
    assert await head_offset(http, url, **limited) == 3
    assert secured.file_of(url).read_bytes() == b"abc"


async def test_deferred_creation_with_upload_past_the_tokens_max_is_413(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    limited = bearer(token(max_size_bytes=4))
    headers = {**TUS, "Upload-Defer-Length": "1", "Content-Type": "application/offset+octet-stream"}
    listed = bearer(token())
    async with http.get(secured.url, headers=listed) as response:
        before = (await response.json())["uploads"]
    async with http.post(secured.url, data=b"abcde", headers={**headers, **limited}) as response:
        assert response.status == 413
        assert "Location" not in response.headers  # the size was known: nothing was created
    async with http.get(secured.url, headers=listed) as response:
        assert (await response.json())["uploads"] == before
    assert not list((secured.settings.data_dir / "uploads").glob("*/*"))


# -- 403: metadata the token does not allow ------------------------------------------------


@pytest.mark.parametrize(
    ("metadata", "status"),
    [
        ({"filetype": "text/html"}, 403),
        ({"filename": "a.png"}, 403),
        ({"filetype": "image/png", "filename": "a.png"}, 201),
    ],
)
async def test_metadata_constraints_of_the_token(
    secured: Server, http: aiohttp.ClientSession, metadata: dict[str, str], status: int
) -> None:
    only_png = bearer(token(metadata={"filetype": ["image/png"]}))
    headers = {**TUS, "Upload-Length": "3", "Upload-Metadata": metadata_header(**metadata)}
    async with http.post(secured.url, headers={**headers, **only_png}) as response:
        assert response.status == status
        text = await response.text()
    if status == 403:
        assert "filetype" in text and "text/html" not in text  # the refused value is not echoed
        assert await owned_ids(http, secured, "alice") == []
        assert upload_files(secured) == []
    else:
        assert await owned_ids(http, secured, "alice") == [
            upload_id_of(response.headers["Location"])
        ]


# -- ?token= only where links need it ------------------------------------------------------


async def test_query_token_is_refused_on_patch(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    params = {"token": token()}
    async with http.patch(url, params=params, data=b"def", headers=patch_headers(3)) as response:
        assert response.status == 401
        assert "Bearer" in await response.text()
    await assert_unchanged(http, secured, url, b"abc")


async def test_query_token_works_for_head_and_download(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    partial = await started_upload(http, secured, b"abc", 6)
    done = await completed_upload(http, secured, b"finished")
    read_only = {"token": token(actions=["read"])}
    async with http.head(partial, params=read_only, headers=TUS) as response:
        assert response.status == 200
        assert response.headers["Upload-Offset"] == "3"
    async with http.get(done, params=read_only) as response:
        assert response.status == 200
        assert await response.read() == b"finished"
    async with http.get(done, params={"token": token("bob", ["read"])}) as response:
        assert response.status == 404


# -- method override, OPTIONS --------------------------------------------------------------


async def test_method_override_is_checked_as_the_overriding_method(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    override = {**TUS, "X-HTTP-Method-Override": "DELETE"}
    upload_only = bearer(token(actions=["create", "upload"]))
    async with http.post(url, headers={**override, **upload_only}) as response:
        assert response.status == 403
        assert "delete" in await response.text()
    await assert_unchanged(http, secured, url, b"abc")
    async with http.post(url, headers={**override, **bearer(token(actions=["delete"]))}) as r:
        assert r.status == 204
    async with http.head(url, headers={**TUS, **bearer(token())}) as response:
        assert response.status == 404


async def test_options_needs_no_token(secured: Server, http: aiohttp.ClientSession) -> None:
    url = await started_upload(http, secured, b"abc", 6)
    for target in (secured.url, url):
        async with http.options(target) as response:
            assert response.status == 204
            assert "creation" in response.headers["Tus-Extension"]


# -- rotating the secret -------------------------------------------------------------------


async def test_rotation_accepts_the_old_secret_until_it_is_dropped(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    both = await make_server(secrets=("new", "old"))
    signed_old = bearer(token("dave", secret="old"))
    url = await create_upload(http, both.url, 6, **signed_old)
    async with http.patch(url, data=b"abc", headers=patch_headers(0, **signed_old)) as response:
        assert response.status == 204
    assert await head_offset(http, url, **bearer(token("dave", secret="new"))) == 3

    new_only = await make_server(secrets=("new",))  # same Redis, same data directory
    url_now = new_only.url + upload_id_of(url)
    async with http.head(url_now, headers={**TUS, **signed_old}) as response:
        assert response.status == 401
    headers = patch_headers(3, **signed_old)
    async with http.patch(url_now, data=b"def", headers=headers) as response:
        assert response.status == 401
        assert "signature" in await response.text()
    signed_new = bearer(token("dave", secret="new"))
    assert await head_offset(http, url_now, **signed_new) == 3
    assert new_only.file_of(url_now).read_bytes() == b"abc"
    async with http.patch(url_now, data=b"def", headers=patch_headers(3, **signed_new)) as r:
        assert r.status == 204
    assert new_only.file_of(url_now).read_bytes() == b"abcdef"


# -- the production guard ------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--production"], ["--host", "0.0.0.0"]])  # noqa: S104
def test_production_or_public_host_without_secret_refuses_to_start(
    tmp_path: Path, args: list[str]
) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUS_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "tusserver", "--port", "0", "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:  # it started after all: stop it and its embedded Redis
            process.send_signal(signal.SIGTERM)
            process.communicate(timeout=20)
    assert process.returncode != 0
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "secret" in lines[0]
    assert "listening" not in stdout
    assert not data_dir.exists()  # refused before touching anything


# -- tokens never reach the logs -----------------------------------------------------------


async def requests_carrying_tokens(http: aiohttp.ClientSession, url: str) -> list[str]:
    """Create, fill, read and refuse requests with tokens in headers and in ?token=; the
    tokens sent."""
    full = token("erin")
    read_only = token("erin", ["read"])
    expired = token("erin", now=time.time() - 3600, ttl_s=60)
    forged = token("erin", secret="another-secret")
    async with http.post(url, headers={**TUS, "Upload-Length": "3", **bearer(full)}) as r:
        assert r.status == 201
        upload_url = r.headers["Location"]
    async with http.patch(upload_url, data=b"abc", headers=patch_headers(0, **bearer(full))) as r:
        assert r.status == 204
    async with http.head(upload_url, params={"token": read_only}, headers=TUS) as response:
        assert response.status == 200

    async def is_complete() -> bool:
        async with http.get(upload_url, params={"token": read_only}) as response:
            await response.read()
            return response.status == 200

    await wait_until(is_complete)
    headers = patch_headers(3)
    async with http.patch(upload_url, params={"token": full}, data=b"x", headers=headers) as r:
        assert r.status == 401
    for refused in (expired, forged):
        async with http.head(upload_url, headers={**TUS, **bearer(refused)}) as response:
            assert response.status == 401
        async with http.get(upload_url, params={"token": refused}) as response:
            assert response.status == 401
    return [full, read_only, expired, forged]


@pytest.mark.parametrize("access_logger", [AccessLogger, JsonAccessLogger])
async def test_tokens_never_appear_in_the_logs(
    flushed_redis: str,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    access_logger: type[AccessLogger],
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.access")
    caplog.set_level(logging.DEBUG, logger="tusserver")
    # served as the CLI serves it: with tusserver's own access logger
    settings = Settings(
        data_dir=tmp_path / "data", port=0, secrets=(SECRET,), allowed_hosts=("127.0.0.1",)
    )
    runner = make_runner(build_app(settings, flushed_redis), access_logger, shutdown_timeout_s=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}{settings.base_path}"
        sent = await requests_carrying_tokens(http, url)
    finally:
        await runner.cleanup()
    logged = caplog.text
    assert "PATCH /files/" in logged or '"method": "PATCH"' in logged  # the log is not empty
    assert "401" in logged
    for value in sent:
        assert value not in logged
        assert value.split(".")[1] not in logged  # not even the signature on its own


async def test_tokens_never_appear_in_a_server_process_log(
    processes: Callable[..., ServerProcess], tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    proc = processes(tmp_path / "proc-data", env={"TUS_SECRET": SECRET})
    sent = await requests_carrying_tokens(http, proc.url)
    assert proc.stop() == 0
    logged = proc.log()
    assert "PATCH /files/" in logged and " 401 " in logged  # the requests were logged
    for value in sent:
        assert value not in logged
        assert value.split(".")[1] not in logged
    assert SECRET not in logged


# -- a client resumes after its token expired ----------------------------------------------


async def test_resume_after_the_token_expired_with_a_refreshed_token(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    """tus-js-client's story: create and send half with one token; by the time the client
    comes back that token has expired (a HEAD with it is 401, and nothing is lost); the
    parent hands out a fresh token for the same subject and upload, and the HEAD, then the
    PATCH from the committed offset, finish the upload."""
    data = os.urandom(96 * 1024 + 7)
    half = len(data) // 2
    ttl_s = 300.0
    issued_at = time.time()
    first = token("carol", ["create", "upload"], ttl_s=ttl_s, now=issued_at)
    headers = {"Upload-Metadata": metadata_header(filename="big.bin"), **bearer(first)}
    url = await create_upload(http, secured.url, len(data), **headers)
    async with http.patch(url, data=data[:half], headers=patch_headers(0, **bearer(first))) as r:
        assert r.status == 204
        assert r.headers["Upload-Offset"] == str(half)

    # The server's clock cannot be moved, so "the same token, an hour later" is that token
    # issued an hour earlier: identical claims, its lifetime (and the leeway) long gone.
    first_an_hour_later = token("carol", ["create", "upload"], ttl_s=ttl_s, now=issued_at - 3600)
    async with http.head(url, headers={**TUS, **bearer(first_an_hour_later)}) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert secured.file_of(url).read_bytes() == data[:half]

    refreshed = bearer(token("carol", ["upload", "read"], upload_id=upload_id_of(url)))
    assert await head_offset(http, url, **refreshed) == half
    async with http.patch(url, data=data[half:], headers=patch_headers(half, **refreshed)) as r:
        assert r.status == 204
        assert r.headers["Upload-Offset"] == str(len(data))
    assert secured.file_of(url).read_bytes() == data

    expected_digest = f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"

    async def has_digest() -> bool:
        async with http.head(url, headers={**TUS, **refreshed}) as response:
            return response.headers.get("Repr-Digest") == expected_digest

    await wait_until(has_digest)
    async with http.get(url, headers=refreshed) as response:
        assert response.status == 200
        assert response.headers["Repr-Digest"] == expected_digest
        assert await response.read() == data
