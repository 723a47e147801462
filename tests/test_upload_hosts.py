"""Issue 18, the Host header (defects 3 and 7): upload URLs are stored, and sent to the parent
in events, so they come from --public-url, or from the Host (a trusted proxy's forwarded host)
only when it is one of --allowed-hosts (loopback names in development mode). Any other Host is
refused (400) on creation and concatenation before anything is created, never a 500; a HEAD
of a final upload names its parts from its stored URL whatever the Host; a secured server
will not start without --public-url or --allowed-hosts. Requests go on plain sockets: an HTTP
client would not send a Host with a space or in Latin-1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support.raw_http import authority_of, exchange, request_bytes
from tests.support.servers import Server, ServerFactory, assert_no_uploads, send_raw
from tests.support.tus import OFFSET_STREAM, TUS, create_upload, patch, path_of, upload_id_of
from tusserver.events.delivery import events_key
from tusserver.settings import SettingError, Settings
from tusserver.store.records import shard_of

SECRET = "upload-hosts-secret"
CREATION = [*TUS.items(), ("Upload-Length", "5")]

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
    assert (await send_raw(server, "POST", "/files/", CREATION, host=host)).status == 400
    with_body = [*CREATION, ("Content-Type", OFFSET_STREAM)]
    answer = await send_raw(server, "POST", "/files/", with_body, b"hello", host=host)
    assert answer.status == 400, answer
    assert "location" not in answer.headers
    await assert_no_uploads(server)


async def test_a_creation_without_a_host_is_400(server: Server) -> None:
    answer = await exchange(server.url, request_bytes("POST", "/files/", CREATION))
    assert answer.status == 400, answer
    await assert_no_uploads(server)


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
    answer = await send_raw(server, "POST", "/files/", headers, host=host)
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
    answer = await send_raw(server, "HEAD", path_of(final), TUS.items(), host=host)
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
    port = authority_of(server.url).rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
        answer = await send_raw(server, "POST", "/files/", CREATION, host=host)
        assert answer.status == 201, answer
        location = answer.headers["location"]
        assert location.startswith(f"http://{host}/files/")
        assert await event_urls(events_redis, upload_id_of(location)) == [location]
    for host in ("evil.example", f"evil.example:{port}", f"localhost.evil.example:{port}"):
        assert (await send_raw(server, "POST", "/files/", CREATION, host=host)).status == 400


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
        answer = await send_raw(server, "POST", "/files/", [*CREATION, *forwarded])
        assert answer.status == 400, (forwarded, answer)
    headers = [*CREATION, ("X-Forwarded-Host", "uploads.example"), ("X-Forwarded-Proto", "https")]
    answer = await send_raw(server, "POST", "/files/", headers, host="evil.example")
    assert answer.status == 201, answer
    location = answer.headers["location"]
    assert location.startswith("https://uploads.example/files/")
    assert await event_urls(events_redis, upload_id_of(location)) == [location]


async def test_with_a_public_url_the_host_header_plays_no_part(
    make_server: ServerFactory, http: aiohttp.ClientSession, events_redis: aioredis.Redis
) -> None:
    public = "https://uploads.example/tus/"
    server = await make_server(public_url=public, allowed_hosts=())
    answer = await send_raw(server, "POST", "/files/", CREATION, host="evil.example")
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
