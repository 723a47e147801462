"""X-Request-Id: kept when it is a short token, made otherwise, on every answer (refusals
too), in the access log line and in the events (and so the webhooks) a request causes.
Real servers; the parser as a pure function."""

from __future__ import annotations

import json
import logging
import re
import string

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.support.events import events_of
from tests.support.servers import Server, ServerFactory
from tests.support.tus import TUS, create_upload, patch_headers, upload_id_of
from tests.support.waiting import wait_until
from tusserver.events.entries import Entry
from tusserver.protocol import MAX_REQUEST_ID_LENGTH, parse_request_id

TOKEN_CHARS = set(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")
GENERATED = re.compile(r"^[0-9a-f]{32}$")


@pytest.mark.parametrize(
    "value", ["abc", "0f8e-4c1a.trace_7", "x" * MAX_REQUEST_ID_LENGTH, "a!#$%&'*+.^_`|~-"]
)
def test_a_short_token_is_kept(value: str) -> None:
    assert parse_request_id(value) == value


@pytest.mark.parametrize(
    "value",
    [None, "", "x" * (MAX_REQUEST_ID_LENGTH + 1), "a b", 'a"b', "a\tb", "é", "a;b", "a\nb"],
)
def test_anything_else_is_refused(value: str | None) -> None:
    assert parse_request_id(value) is None


@given(st.text(max_size=200))
def test_a_kept_id_is_always_a_bounded_token(value: str) -> None:
    kept = parse_request_id(value)
    if kept is not None:
        assert kept == value
        assert 1 <= len(kept) <= MAX_REQUEST_ID_LENGTH
        assert set(kept) <= TOKEN_CHARS


async def test_the_clients_id_comes_back_on_success_and_refusal(
    server: Server, http: aiohttp.ClientSession
) -> None:
    sent = {"X-Request-Id": "trace-42", "Tus-Resumable": "1.0.0"}
    async with http.post(server.url, headers={**sent, "Upload-Length": "3"}) as created:
        assert created.status == 201
        assert created.headers["X-Request-Id"] == "trace-42"
    async with http.head(server.url + "0" * 32, headers=sent) as missing:
        assert missing.status == 404
        assert missing.headers["X-Request-Id"] == "trace-42"
    wrong_version = {**sent, "Tus-Resumable": "0.2.2"}
    async with http.post(server.url, headers=wrong_version) as refused:
        assert refused.status == 412
        assert refused.headers["X-Request-Id"] == "trace-42"
    async with http.get(server.root + "/no/such/route", headers=sent) as unrouted:
        assert unrouted.status == 404
        assert unrouted.headers["X-Request-Id"] == "trace-42"


async def test_a_missing_or_unsafe_id_is_replaced_by_a_new_one_each_time(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("s3cret",))
    seen = []
    for header in ({}, {"X-Request-Id": "has space"}, {"X-Request-Id": "y" * 500}):
        async with http.post(server.url, headers={"Tus-Resumable": "1.0.0", **header}) as answer:
            assert answer.status == 401  # no token: refused, and still named
            seen.append(answer.headers["X-Request-Id"])
    assert all(GENERATED.match(request_id) for request_id in seen)
    assert len(set(seen)) == 3


async def test_the_access_log_line_names_the_request_id(
    server: Server, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    url = await create_upload(http, server.url, 5)
    async with http.head(url, headers={"Tus-Resumable": "1.0.0", "X-Request-Id": "rid-7"}):
        pass

    def head_lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("HEAD ")]

    await wait_until(lambda: bool(head_lines()), what="the HEAD's access log line")
    assert head_lines()[-1].endswith(" rid=rid-7")


async def test_the_events_a_request_causes_name_its_id(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    url = await create_upload(http, server.url, 3, **{"X-Request-Id": "made-here"})
    headers = {**patch_headers(0), "X-Request-Id": "finished-here"}
    async with http.patch(url, data=b"abc", headers=headers) as patched:
        assert patched.status == 204
    async with http.delete(url, headers={**TUS, "X-Request-Id": "removed-here"}) as deleted:
        assert deleted.status == 204
    events = await events_of(flushed_redis, upload_id_of(url))
    assert [(e["type"], e["request_id"]) for e in events] == [
        ("created", "made-here"),
        ("completed", "finished-here"),
        ("terminated", "removed-here"),
    ]
    webhook = json.loads(Entry(0, "1-0", events[1]).body())
    assert webhook["request_id"] == "finished-here"
