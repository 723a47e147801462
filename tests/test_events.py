"""Events for the parent service, against a real webhook receiver (an aiohttp app on 127.0.0.1),
a real Redis and real tusserver processes: signed delivery of exactly the events of an upload,
retries after errors, timeouts and a receiver that is down, survival of SIGKILL, one delivery
per event across two processes, the dead-letter stream, pulling with redis-py, and the
pre-create check."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
import redis
from aiohttp import web

from tests.support.processes import ServerProcess, free_port
from tests.support.servers import ServerFactory
from tests.support.tus import TUS, create_upload, patch_headers, upload_id_of
from tests.support.waiting import wait_until
from tests.support.webhooks import Received, Receiver
from tusserver.auth import issue_token
from tusserver.events.delivery import GROUP, DeliveryPolicy, Outbox, dead_letter_key, events_key
from tusserver.events.parent import signature_header, signing_secrets_of, verify_signature
from tusserver.settings import SettingError, Settings, build_settings
from tusserver.store.client import connect
from tusserver.store.records import SHARD_COUNT, shard_of

SECRET = "parent-webhook-secret"
FAST = {"webhook_backoff_s": 0.02, "webhook_backoff_max_s": 0.1}


# -- a parent's webhook ----------------------------------------------------------------------


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    await hook.start()
    yield hook
    await hook.stop()


def verify(header: str, body: bytes, secret: str, tolerance_s: int = 300) -> bool:
    """docs/events.md's verifier for parents, as printed there."""
    fields = [part.split("=", 1) for part in header.split(",") if "=" in part]
    stamps = [value for key, value in fields if key == "t"]
    if len(stamps) != 1 or not (stamps[0].isascii() and stamps[0].isdigit()):
        return False
    if abs(time.time() - int(stamps[0])) > tolerance_s:
        return False
    signed = stamps[0].encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest().encode()
    return any(hmac.compare_digest(v.encode(), expected) for k, v in fields if k == "v1")


def signed_by(received: Received, secret: str) -> bool:
    return verify(received.headers.get("Tus-Signature", ""), received.body, secret)


@pytest.fixture
async def outbox_redis(flushed_redis: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(flushed_redis, decode_responses=True)
    yield client
    await client.aclose()


async def drained(client: redis.asyncio.Redis) -> bool:
    """No event left in any stream and none pending: nothing more can be delivered."""
    for shard in range(SHARD_COUNT):
        if await client.xlen(events_key(shard)):
            return False
    return True


async def pending_tries(client: redis.asyncio.Redis, shard: int) -> dict[str, int]:
    rows = await client.xpending_range(events_key(shard), GROUP, "-", "+", 100)
    return {str(row["message_id"]): int(row["times_delivered"]) for row in rows}


async def dead_letters(client: redis.asyncio.Redis, shard: int) -> list[dict[str, str]]:
    rows = cast(list[tuple[str, dict[str, str]]], await client.xrange(dead_letter_key(shard)))
    return [fields for _id, fields in rows]


# -- delivery in one process -----------------------------------------------------------------


async def test_an_upload_sends_exactly_its_created_and_completed_events_signed(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    outbox_redis: redis.asyncio.Redis,
) -> None:
    server = await make_server(webhook_url=receiver.url, webhook_secret=SECRET)
    location = await create_upload(
        http, server.url, 11, **{"Upload-Metadata": "filename aGVsbG8udHh0"}
    )
    for offset, part in ((0, b"hello"), (5, b" world")):
        async with http.patch(location, data=part, headers=patch_headers(offset)) as response:
            assert response.status == 204
    await wait_until(lambda: bool(receiver.accepted_events("completed")))
    await wait_until(lambda: drained(outbox_redis))

    assert [event["type"] for event in receiver.accepted_events()] == ["created", "completed"]
    assert all(signed_by(received, SECRET) for received in receiver.accepted)
    assert all(received.path == "/hooks" for received in receiver.accepted)
    created, completed = receiver.accepted_events()
    upload_id = upload_id_of(location)
    shard = shard_of(upload_id)
    assert completed["id"] == f"{shard}:{completed['stream_id']}" != created["id"]
    assert completed["shard"] == shard
    assert completed["upload_id"] == created["upload_id"] == upload_id
    assert completed["owner"] == "anonymous"
    assert (completed["length"], completed["offset"], created["offset"]) == (11, 11, 0)
    assert completed["metadata"] == {"filename": "hello.txt"}
    assert completed["upload_metadata"] == "filename aGVsbG8udHh0"
    assert completed["sha256"] == hashlib.sha256(b"hello world").hexdigest()
    assert created["sha256"] is None
    assert completed["url"] == location
    assert (server.settings.data_dir / completed["path"]).read_bytes() == b"hello world"
    assert await pending_tries(outbox_redis, shard) == {}


async def test_the_signature_is_checkable_and_breaks_with_the_body(
    make_server: ServerFactory, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    server = await make_server(webhook_url=receiver.url, webhook_secret=SECRET)
    await create_upload(http, server.url, 3)
    await wait_until(lambda: bool(receiver.accepted))
    received = receiver.accepted[0]
    header = received.headers["Tus-Signature"]
    assert verify_signature(header, received.body, [SECRET])
    assert not verify_signature(header, received.body + b" ", [SECRET])
    assert not verify_signature(header, received.body, ["another secret"])
    stamp = int(header.split(",")[0].removeprefix("t="))
    assert not verify_signature(header, received.body, [SECRET], now=stamp + 301)


async def test_secured_mode_signs_with_every_token_secret_for_rotation(
    make_server: ServerFactory, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    server = await make_server(webhook_url=receiver.url, secrets=("new-secret", "old-secret"))
    token = issue_token("old-secret", subject="alice", actions=["create"], ttl_s=60)
    await create_upload(http, server.url, 0, Authorization=f"Bearer {token}")
    await wait_until(lambda: len(receiver.accepted) == 2)
    for received in receiver.accepted:
        assert received.json["owner"] == "alice"
        assert verify_signature(received.headers["Tus-Signature"], received.body, ["new-secret"])
        assert verify_signature(received.headers["Tus-Signature"], received.body, ["old-secret"])


async def test_development_mode_without_a_webhook_secret_sends_unsigned_and_warns(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tusserver.events.delivery")
    server = await make_server(webhook_url=receiver.url)
    assert any("unsigned" in record.message for record in caplog.records)
    await create_upload(http, server.url, 3)
    await wait_until(lambda: bool(receiver.accepted))
    assert "Tus-Signature" not in receiver.accepted[0].headers


async def test_completed_event_arrives_after_a_timeout_and_an_error(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    outbox_redis: redis.asyncio.Redis,
) -> None:
    def answer(received: Received) -> web.Response | None:
        if received.json["type"] != "completed" or received.attempt >= 3:
            return web.Response(status=204)
        return None if received.attempt == 1 else web.Response(status=500)

    receiver.answer = answer
    server = await make_server(
        webhook_url=receiver.url, webhook_secret=SECRET, webhook_timeout_s=0.5, **FAST
    )
    await create_upload(http, server.url, 0)  # created and completed at once
    await wait_until(lambda: bool(receiver.accepted_events("completed")))
    await wait_until(lambda: drained(outbox_redis))

    tries = [r for r in receiver.requests if r.json["type"] == "completed"]
    assert [r.attempt for r in tries][:3] == [1, 2, 3]
    assert len({r.body for r in tries}) == 1  # the same event, byte for byte
    assert all(signed_by(r, SECRET) for r in tries)


async def test_completed_event_arrives_after_the_receiver_was_down(
    make_server: ServerFactory, http: aiohttp.ClientSession, outbox_redis: redis.asyncio.Redis
) -> None:
    port = free_port()  # nothing listens here yet: connections are refused
    hook = Receiver()
    server = await make_server(
        webhook_url=f"http://127.0.0.1:{port}/hooks", webhook_secret=SECRET, **FAST
    )
    location = await create_upload(http, server.url, 0)
    shard = shard_of(upload_id_of(location))

    async def tried_three_times() -> bool:
        return any(tries >= 3 for tries in (await pending_tries(outbox_redis, shard)).values())

    await wait_until(tried_three_times)
    held = await pending_tries(outbox_redis, shard)
    await hook.start(port)
    try:
        await wait_until(lambda: bool(hook.accepted_events("completed")))
        await wait_until(lambda: drained(outbox_redis))
    finally:
        await hook.stop()
    completed = hook.accepted_events("completed")[0]
    assert completed["stream_id"] in held
    assert completed["upload_id"] == upload_id_of(location)
    assert max(r.attempt for r in hook.accepted) >= 3
    assert all(signed_by(r, SECRET) for r in hook.accepted)


async def test_the_parent_deletes_a_completed_upload_with_a_delete_token(
    make_server: ServerFactory, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    server = await make_server(webhook_url=receiver.url, secrets=("shared",))
    client_token = issue_token("shared", subject="bob", actions=["create", "upload"], ttl_s=60)
    bearer = {"Authorization": f"Bearer {client_token}"}
    location = await create_upload(http, server.url, 2, **bearer)
    async with http.patch(location, data=b"ok", headers=patch_headers(0, **bearer)) as response:
        assert response.status == 204
    await wait_until(lambda: bool(receiver.accepted_events("completed")))
    [event] = receiver.accepted_events("completed")
    assert (server.settings.data_dir / event["path"]).read_bytes() == b"ok"

    # what docs/events.md tells the parent to do once it has the file
    token = issue_token("shared", subject=event["owner"], actions=["delete"],
                        upload_id=event["upload_id"], ttl_s=60)  # fmt: skip
    headers = {**TUS, "Authorization": f"Bearer {token}"}
    async with http.delete(event["url"], headers=headers) as response:
        assert response.status == 204
    await wait_until(lambda: bool(receiver.accepted_events("terminated")))
    assert receiver.accepted_events("terminated")[0]["upload_id"] == event["upload_id"]
    assert not (server.settings.data_dir / event["path"]).exists()


# -- the dead-letter stream ------------------------------------------------------------------


async def test_events_failing_every_try_move_to_the_dead_letter_stream_and_the_log(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    outbox_redis: redis.asyncio.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver.answer = lambda _received: web.Response(status=500)
    server = await make_server(webhook_url=receiver.url, webhook_max_tries=3, **FAST)
    location = await create_upload(http, server.url, 0)
    shard = shard_of(upload_id_of(location))

    async def both_dead() -> bool:
        return int(await outbox_redis.xlen(dead_letter_key(shard))) == 2

    await wait_until(both_dead)
    await wait_until(lambda: drained(outbox_redis))
    dead = await dead_letters(outbox_redis, shard)
    assert sorted(fields["type"] for fields in dead) == ["completed", "created"]
    assert {(fields["tries"], fields["error"]) for fields in dead} == {("3", "HTTP 500")}
    assert all(fields["upload_id"] == upload_id_of(location) for fields in dead)
    attempts = Counter((r.json["id"], r.attempt) for r in receiver.requests)
    assert sorted(attempts.values()) == [1] * 6
    assert {event_id for event_id, _attempt in attempts} == {f["event_id"] for f in dead}
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for fields in dead:
        assert any(fields["event_id"] in line and "dead" in line for line in logged)
    assert await pending_tries(outbox_redis, shard) == {}


async def test_events_older_than_the_maximum_age_are_dead_after_one_failed_try(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    outbox_redis: redis.asyncio.Redis,
) -> None:
    receiver.answer = lambda _received: web.Response(status=503)
    server = await make_server(webhook_url=receiver.url, webhook_max_age_s=0.001, **FAST)
    location = await create_upload(http, server.url, 5)
    shard = shard_of(upload_id_of(location))

    async def dead() -> bool:
        return int(await outbox_redis.xlen(dead_letter_key(shard))) == 1

    await wait_until(dead)
    [fields] = await dead_letters(outbox_redis, shard)
    assert (fields["type"], fields["tries"], fields["error"]) == ("created", "1", "HTTP 503")
    assert len(receiver.requests) == 1


async def test_the_dead_letter_stream_keeps_only_its_newest_entries(
    flushed_redis: str, outbox_redis: redis.asyncio.Redis
) -> None:
    client = await connect(flushed_redis)
    try:
        outbox = Outbox(client, consumer="test", dead_letter_maxlen=3)
        await outbox.ensure_group(7)
        for number in range(5):
            await outbox_redis.xadd(events_key(7), {"type": "created", "upload_id": str(number)})
        entries = await outbox.read_new(7, 10, None)
        assert await Outbox(client, consumer="other").bury(entries[0], tries=1, error="x") is False
        for entry in entries:
            assert await outbox.bury(entry, tries=2, error="HTTP 500")
    finally:
        await client.aclose()
    dead = await dead_letters(outbox_redis, 7)
    assert [fields["upload_id"] for fields in dead] == ["2", "3", "4"]
    assert await outbox_redis.xlen(events_key(7)) == 0


# -- processes: SIGKILL, and two of them on one Redis ----------------------------------------


def process_args(redis_url: str, webhook_url: str) -> tuple[str, ...]:
    return ("--redis-url", redis_url, "--webhook-url", webhook_url,
            "--webhook-secret", SECRET, "--webhook-timeout", "1s")  # fmt: skip


async def test_completed_event_survives_sigkill_of_the_delivering_process(
    flushed_redis: str,
    tmp_path: Path,
    processes: Callable[..., ServerProcess],
    http: aiohttp.ClientSession,
    receiver: Receiver,
    outbox_redis: redis.asyncio.Redis,
) -> None:
    accepting = False

    def answer(received: Received) -> web.Response:
        refused = received.json["type"] == "completed" and not accepting
        return web.Response(status=503 if refused else 204)

    receiver.answer = answer
    args = process_args(flushed_redis, receiver.url)
    first = await asyncio.to_thread(processes, tmp_path / "data", *args)
    location = await create_upload(http, first.url, 5)
    async with http.patch(location, data=b"12345", headers=patch_headers(0)) as response:
        assert response.status == 204

    def tried() -> list[Received]:
        return [r for r in receiver.requests if r.json["type"] == "completed"]

    await wait_until(lambda: bool(tried()))
    first.stop(signal.SIGKILL)
    tried_id = tried()[0].json["id"]
    accepting = True
    second = await asyncio.to_thread(processes, tmp_path / "data", *args)
    try:
        await wait_until(lambda: bool(receiver.accepted_events("completed")), 20)
        await wait_until(lambda: drained(outbox_redis))
    except AssertionError:
        print(first.log(), second.log())
        raise
    # a timed-out try may be repeated (at least once), but it is always the same event
    assert {e["id"] for e in receiver.accepted_events("completed")} == {tried_id}
    completed = receiver.accepted_events("completed")[0]
    assert completed["upload_id"] == upload_id_of(location)
    assert completed["sha256"] == hashlib.sha256(b"12345").hexdigest()
    created = receiver.accepted_events("created")
    assert len({e["id"] for e in created}) == 1
    assert created[0]["upload_id"] == completed["upload_id"]
    assert all(signed_by(r, SECRET) for r in receiver.requests)


async def test_two_processes_deliver_each_event_once(
    flushed_redis: str,
    tmp_path: Path,
    processes: Callable[..., ServerProcess],
    http: aiohttp.ClientSession,
    receiver: Receiver,
    outbox_redis: redis.asyncio.Redis,
) -> None:
    args = process_args(flushed_redis, receiver.url)
    pair = await asyncio.gather(
        asyncio.to_thread(processes, tmp_path / "data", *args),
        asyncio.to_thread(processes, tmp_path / "data", *args),
    )
    locations = []
    for number in range(12):
        endpoint = pair[number % 2].url
        if number % 3:
            locations.append(await create_upload(http, endpoint, 0))
            continue
        location = await create_upload(http, endpoint, 2)
        async with http.patch(location, data=b"ab", headers=patch_headers(0)) as response:
            assert response.status == 204
        locations.append(location)
    expected = {(upload_id_of(loc), kind) for loc in locations for kind in ("created", "completed")}

    def delivered() -> set[tuple[str, str]]:
        return {(e["upload_id"], e["type"]) for e in receiver.accepted_events()}

    await wait_until(lambda: delivered() == expected, 20)
    await wait_until(lambda: drained(outbox_redis))
    counts = Counter(r.json["id"] for r in receiver.requests)
    retried = {r.json["id"] for r in receiver.requests if r.attempt > 1}
    assert len(counts) == len(expected)
    assert {event_id for event_id, n in counts.items() if n > 1} <= retried


# -- pull instead of push ----------------------------------------------------------------------


def pull_events(redis_url: str, handle: Callable[[str, dict[str, str]], None]) -> int:
    """The loop docs/events.md shows a parent (one round here, so the test ends)."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    streams: dict[Any, Any] = {f"tus:{{{shard}}}:events": ">" for shard in range(16)}
    for stream in streams:
        try:
            r.xgroup_create(stream, "parent", id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
    handled = 0
    reply = r.xreadgroup("parent", "worker-1", streams, count=100, block=1000)
    for stream, entries in cast(list[tuple[str, list[tuple[str, dict[str, str]]]]], reply):
        for entry_id, fields in entries:
            handle(entry_id, fields)
            r.xack(stream, "parent", entry_id)
            r.xdel(stream, entry_id)
            handled += 1
    r.close()
    return handled


async def test_a_parent_can_pull_events_as_a_consumer_group(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    flushed_redis: str,
    outbox_redis: redis.asyncio.Redis,
) -> None:
    server = await make_server()
    location = await create_upload(http, server.url, 0)
    seen: list[dict[str, str]] = []
    handled = await asyncio.to_thread(
        pull_events, flushed_redis, lambda _id, fields: seen.append(fields)
    )
    assert handled == 2
    assert [(f["type"], f["upload_id"]) for f in seen] == [
        ("created", upload_id_of(location)),
        ("completed", upload_id_of(location)),
    ]
    assert await drained(outbox_redis)


# -- the pre-create check ----------------------------------------------------------------------


async def test_pre_create_check_asks_the_parent_and_accepts(
    make_server: ServerFactory, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    server = await make_server(pre_create_url=receiver.url, webhook_secret=SECRET)
    headers = {**TUS, "Upload-Length": "5", "Upload-Metadata": "filename YS50eHQ=",
               "Upload-Concat": "partial"}  # fmt: skip
    async with http.post(server.url, headers=headers) as response:
        assert response.status == 201
    [asked] = receiver.requests
    assert signed_by(asked, SECRET)
    assert asked.json == {
        "type": "pre-create",
        "subject": "anonymous",
        "length": 5,
        "metadata": {"filename": "a.txt"},
        "upload_metadata": "filename YS50eHQ=",
        "concat": "partial",
    }


async def test_pre_create_refusal_reaches_the_client_as_403_with_the_reason(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    outbox_redis: redis.asyncio.Redis,
) -> None:
    answers = iter(
        [
            web.Response(status=403, text="quota exceeded:\n10 GB used"),
            web.json_response({"reason": "no .exe files"}, status=422),
        ]
    )
    receiver.answer = lambda _received: next(answers)
    server = await make_server(pre_create_url=receiver.url)
    for reason in ("quota exceeded: 10 GB used", "no .exe files"):
        async with http.post(server.url, headers={**TUS, "Upload-Length": "5"}) as response:
            assert response.status == 403
            assert await response.text() == reason + "\n"
    assert await drained(outbox_redis)  # no `created` event: nothing was created
    assert not [p for p in (server.settings.data_dir / "uploads").rglob("*") if p.is_file()]


async def test_pre_create_without_an_answer_in_time_is_503(
    make_server: ServerFactory, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    answers: list[web.Response | None] = [None, web.Response(status=500)]
    receiver.answer = lambda _received: answers.pop(0)
    server = await make_server(pre_create_url=receiver.url, pre_create_timeout_s=0.3)
    for _answer in range(2):
        async with http.post(server.url, headers={**TUS, "Upload-Length": "5"}) as response:
            assert response.status == 503
            assert "Retry-After" in response.headers
    down = await make_server(pre_create_url=f"http://127.0.0.1:{free_port()}/")
    async with http.post(down.url, headers={**TUS, "Upload-Length": "5"}) as response:
        assert response.status == 503


# -- pure parts ----------------------------------------------------------------------------------


def test_signature_test_vector_of_the_docs() -> None:
    body = b'{"id":"3:1700000000000-0","type":"completed"}'
    header = signature_header(["whsec-example"], body, 1700000000)
    assert header == (
        "t=1700000000,v1=" + hmac.new(b"whsec-example", b"1700000000." + body, "sha256").hexdigest()
    )
    assert header == DOCUMENTED_HEADER
    assert verify_signature(header, body, ["whsec-example"], now=1700000100)


DOCUMENTED_HEADER = (
    "t=1700000000,v1=8dad1172d5e25adafd3bf159affadb48b8b5d4e2a36d61140575b113f4f8a621"
)


def test_malformed_signature_headers_do_not_verify() -> None:
    for header in ("", "t=1,v1=", "v1=abc", "t=x,v1=abc", "t=1,t=2,v1=abc", "t=\u00b2,v1=a",
                   "t=1,v1=\u00e9\u00e9"):  # fmt: skip
        assert not verify_signature(header, b"{}", ["s"], now=1)
        assert not verify(header, b"{}", "s", tolerance_s=2**31)


def test_backoff_doubles_within_its_jitter_and_stops_at_the_maximum() -> None:
    policy = DeliveryPolicy(backoff_s=1.0, backoff_max_s=10.0)
    for next_try, ceiling in ((2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 10.0), (40, 10.0)):
        for _ in range(20):
            assert ceiling / 2 <= policy.delay_before(next_try) <= ceiling
    assert DeliveryPolicy(timeout_s=10).claim_idle_s == 30


def test_webhook_settings_come_from_flags_and_environment_and_hide_the_secret() -> None:
    settings = build_settings(
        {"webhook_url": "http://127.0.0.1:9/hooks", "webhook_max_tries": 5},
        {"TUS_WEBHOOK_SECRET": "hidden-value", "TUS_WEBHOOK_TIMEOUT": "2s",
         "TUS_PRE_CREATE_URL": "https://parent.example/check"},
    )  # fmt: skip
    assert (settings.webhook_timeout_s, settings.webhook_max_tries) == (2.0, 5)
    assert settings.webhook_secret == "hidden-value"
    assert "hidden-value" not in repr(settings)
    assert signing_secrets_of(settings) == ("hidden-value",)
    with pytest.raises(SettingError):
        Settings(webhook_url="parent/hooks")
    with pytest.raises(SettingError):
        Settings(webhook_max_tries=0)
