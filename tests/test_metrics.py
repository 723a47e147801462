"""GET /metrics: Prometheus text counting real uploads on real servers: requests by method
and status class, bytes, uploads created/completed/terminated, open connections, PATCH time,
disk-full refusals; the bearer token; --no-metrics; two workers summed in one scrape, with
refusals by status and reason, a lock takeover, uploads in flight, webhook deliveries, a
dead-lettered event and pre-create checks; where each streamed body was read."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support.faults import MiB, finish_upload
from tests.support.processes import StartProcess, start_server
from tests.support.raw_http import exchange, raw_patch, send_until_answered
from tests.support.servers import Server, ServerFactory
from tests.support.tus import TUS, create_upload, head_offset, patch, patch_headers
from tests.support.waiting import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, root: str, **headers: str) -> Samples:
    async with http.get(root + "/metrics", headers=headers) as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_an_upload_a_termination_and_a_refusal_move_the_counters(
    server: Server, http: aiohttp.ClientSession
) -> None:
    before = await scrape(http, server.root)
    url = await create_upload(http, server.url, 5)
    async with http.patch(url, data=b"hello", headers=patch_headers(0)) as patched:
        assert patched.status == 204
    doomed = await create_upload(http, server.url, 10)
    async with http.delete(doomed, headers=TUS) as deleted:
        assert deleted.status == 204
    async with http.head(server.url + "0" * 32, headers=TUS) as missing:
        assert missing.status == 404
    after = await scrape(http, server.root)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tusserver_uploads_created_total") == 2
    assert moved("tusserver_uploads_completed_total") == 1
    assert moved("tusserver_uploads_terminated_total") == 1
    assert moved("tusserver_bytes_received_total") == 5
    assert moved("tusserver_requests_total", method="POST", status="2xx") == 2
    assert moved("tusserver_requests_total", method="PATCH", status="2xx") == 1
    assert moved("tusserver_requests_total", method="DELETE", status="2xx") == 1
    assert moved("tusserver_requests_total", method="HEAD", status="4xx") == 1
    assert moved("tusserver_patch_duration_seconds_count") == 1
    assert value(after, "tusserver_connections_open") >= 1  # the scrape's own connection


async def test_a_refusal_for_lack_of_disk_is_counted(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(min_free_disk_bytes=2**62)
    async with http.post(server.url, headers={**TUS, "Upload-Length": "5"}) as refused:
        assert refused.status == 507
    samples = await scrape(http, server.root)
    assert value(samples, "tusserver_disk_full_refusals_total") == 1
    assert value(samples, "tusserver_requests_total", method="POST", status="5xx") == 1
    assert value(samples, "tusserver_uploads_created_total") == 0


async def test_a_metrics_token_is_required_when_set(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(metrics_token="scrape-me")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-me"}):
        async with http.get(server.root + "/metrics", headers=headers) as refused:
            assert refused.status == 401
    samples = await scrape(http, server.root, Authorization="Bearer scrape-me")
    assert ("tusserver_bytes_received_total", frozenset()) in samples


async def test_no_metrics_means_no_route(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(metrics=False)
    async with http.get(server.root + "/metrics") as response:
        assert response.status == 404


@pytest.mark.skipif(sys.platform != "linux", reason="one socket per worker (SO_REUSEPORT)")
@pytest.mark.fresh_connections  # every request may land on either worker
async def test_any_worker_answers_the_sum_over_all_workers(
    tmp_path: Path, processes: StartProcess, http: aiohttp.ClientSession
) -> None:
    server = await start_server(processes, tmp_path / "data", "--workers", "2")
    root = server.url.split("/files/")[0]
    uploads = 12
    for _ in range(uploads):
        url = await create_upload(http, server.url, 3)
        async with http.patch(url, data=b"abc", headers=patch_headers(0)) as patched:
            assert patched.status == 204
    assert any((tmp_path / "data" / "metrics").iterdir())  # the workers' shared folder
    for _ in range(4):  # each scrape lands on either worker: every one sees the sum
        samples = await scrape(http, root)
        assert value(samples, "tusserver_uploads_created_total") == uploads
        assert value(samples, "tusserver_uploads_completed_total") == uploads
        assert value(samples, "tusserver_bytes_received_total") == 3 * uploads
        assert value(samples, "tusserver_requests_total", method="PATCH", status="2xx") == uploads


async def test_a_request_the_parser_refused_is_counted(
    server: Server, http: aiohttp.ClientSession
) -> None:
    def refused(samples: Samples) -> float:
        return sum(
            count
            for (name, labels), count in samples.items()
            if name == "tusserver_requests_total" and ("status", "4xx") in labels
        )

    before = await scrape(http, server.root)
    malformed = b"POST /files/ HTTP/1.1\r\nHost: h\r\nContent-Length: abc\r\n\r\n"
    assert (await exchange(server.url, malformed)).status == 400
    assert refused(await scrape(http, server.root)) == refused(before) + 1


# -- two workers: every kind of count, summed over the workers -----------------------------


@dataclass
class Parent:
    """A parent service on 127.0.0.1: accepts every pre-create question and every webhook
    event but `terminated`, which it refuses (500) so that event is dead-lettered."""

    events: list[str] = field(default_factory=list)
    questions: int = 0

    async def hook(self, request: web.Request) -> web.Response:
        kind = (await request.json())["type"]
        self.events.append(kind)
        return web.Response(status=500 if kind == "terminated" else 204)

    async def pre_create(self, request: web.Request) -> web.Response:
        await request.read()
        self.questions += 1
        return web.Response(status=204)


@pytest.fixture
async def parent() -> AsyncIterator[tuple[Parent, str]]:
    answers = Parent()
    app = web.Application()
    app.router.add_post("/hooks", answers.hook)
    app.router.add_post("/pre-create", answers.pre_create)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield answers, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def take_over_a_running_patch(
    http: aiohttp.ClientSession, endpoint: str, root: str
) -> list[int]:
    """A PATCH that sent part of its body and went silent is taken over by a new PATCH (as in
    test_takeover.py); the upload is then finished. While the silent PATCH holds the upload,
    the workers' in-flight gauge sums to 1. The statuses of the PATCHes after the takeover
    (a 409 when HEAD read the offset before the holder committed)."""
    source = os.urandom(4 * MiB)
    url = await create_upload(http, endpoint, len(source))
    async with raw_patch(url, 0, len(source)) as silent:
        await silent.send(source[:MiB])

        async def one_in_flight() -> bool:
            return value(await scrape(http, root), "tusserver_uploads_in_flight") == 1

        await wait_until(one_in_flight, what="the silent PATCH counted in flight")
        resume_at = await head_offset(http, url)
        async with raw_patch(url, resume_at, 64 * 1024) as new:
            answer = await send_until_answered(new, source[resume_at : resume_at + 64 * 1024])
        assert answer is not None and answer.status in (204, 409), answer
        interrupted = await silent.response()
    assert interrupted.status == 400, interrupted
    return [answer.status, *await finish_upload(http, url, source)]


@pytest.mark.skipif(sys.platform != "linux", reason="one socket per worker (SO_REUSEPORT)")
@pytest.mark.fresh_connections  # every request may land on either worker
async def test_two_workers_count_refusals_takeovers_webhooks_and_checks_in_one_sum(
    tmp_path: Path,
    processes: StartProcess,
    http: aiohttp.ClientSession,
    parent: tuple[Parent, str],
) -> None:
    answers, parent_url = parent
    server = await start_server(
        processes, tmp_path / "data", "--workers", "2",
        "--webhook-url", parent_url + "/hooks", "--webhook-max-tries", "1",
        "--pre-create-url", parent_url + "/pre-create",
    )  # fmt: skip
    root = server.url.split("/files/")[0]
    completed = await create_upload(http, server.url, 5)
    assert (await patch(http, completed, 0, b"hello")).status == 204
    assert (await patch(http, completed, 2, b"llo")).status == 409
    terminated = await create_upload(http, server.url, 10)
    async with http.delete(terminated, headers=TUS) as deleted:
        assert deleted.status == 204
    async with http.head(server.url + "0" * 32, headers=TUS) as missing:
        assert missing.status == 404
    async with http.head(completed, headers={"Tus-Resumable": "0.2.2"}) as old_version:
        assert old_version.status == 412
    after_takeover = await take_over_a_running_patch(http, server.url, root)
    assert set(after_takeover) <= {204, 409}, after_takeover
    # 3 creations: created x3, completed x2 delivered; terminated refused, then dead-lettered
    await wait_until(lambda: len(answers.events) == 6, what=lambda: f"events: {answers.events}")

    expected = {
        ("tusserver_uploads_created_total", ()): 3,
        ("tusserver_uploads_completed_total", ()): 2,
        ("tusserver_uploads_terminated_total", ()): 1,
        ("tusserver_bytes_received_total", ()): 5 + 4 * MiB,
        ("tusserver_errors_total", (("status", "409"), ("reason", "offset_mismatch"))): 1
        + after_takeover.count(409),
        ("tusserver_errors_total", (("status", "404"), ("reason", "upload_not_found"))): 1,
        ("tusserver_errors_total", (("status", "412"), ("reason", "precondition_failed"))): 1,
        ("tusserver_errors_total", (("status", "400"), ("reason", "interrupted"))): 1,
        ("tusserver_lock_waits_total", (("result", "acquired"),)): 1,
        ("tusserver_lock_takeovers_total", ()): 1,
        ("tusserver_webhook_deliveries_total", (("result", "delivered"),)): 5,
        ("tusserver_webhook_deliveries_total", (("result", "refused"),)): 1,
        ("tusserver_events_dead_lettered_total", ()): 1,
        ("tusserver_pre_create_checks_total", (("result", "accepted"),)): 3,
        ("tusserver_uploads_in_flight", ()): 0,
    }

    def seen(samples: Samples) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {(name, labels): value(samples, name, **dict(labels)) for name, labels in expected}

    last: list[Samples] = []

    async def counted() -> bool:  # the dead letter is counted just after the parent answers
        last[:] = [await scrape(http, root)]
        return seen(last[0]) == expected

    await wait_until(counted, what=lambda: f"the counts, seen: {seen(last[0])}")
    for _ in range(4):  # each scrape lands on either worker: every one sees the sum
        assert seen(await scrape(http, root)) == expected
    assert answers.questions == 3
    # both workers counted (prometheus-client keeps one file per process and kind)
    writers = {path.stem.rpartition("_")[2] for path in (tmp_path / "data" / "metrics").iterdir()}
    assert len(writers) >= 2, writers


async def test_refused_and_failed_checks_and_an_unreachable_webhook_are_counted(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    """The pre-create check's other results (the parent refuses; the parent fails) and a
    webhook nobody listens on, each counted under its own label."""
    answers = iter([403, 500, 204])

    async def pre_create(_request: web.Request) -> web.Response:
        return web.Response(status=next(answers), text="no")

    parent = web.Application()
    parent.router.add_post("/pre-create", pre_create)
    runner = web.AppRunner(parent)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        port = runner.addresses[0][1]
        with socket.socket() as closed:  # a port nobody listens on
            closed.bind(("127.0.0.1", 0))
            dead_port = closed.getsockname()[1]
        server = await make_server(
            pre_create_url=f"http://127.0.0.1:{port}/pre-create",
            webhook_url=f"http://127.0.0.1:{dead_port}/hook",
            webhook_timeout_s=0.5,
        )
        for status in (403, 503, 201):  # the last one's `created` event goes to the hook
            async with http.post(server.url, headers={**TUS, "Upload-Length": "1"}) as r:
                assert r.status == status
        samples = await scrape(http, server.root)
        checks = "tusserver_pre_create_checks_total"
        assert value(samples, checks, result="refused") == 1
        assert value(samples, checks, result="failed") == 1
        assert value(samples, checks, result="accepted") == 1

        async def tried_the_dead_hook() -> bool:
            samples = await scrape(http, server.root)
            return value(samples, "tusserver_webhook_deliveries_total", result="unreachable") >= 1

        await wait_until(tried_the_dead_hook, 20, what="a try at the webhook nobody serves")
        samples = await scrape(http, server.root)
        assert value(samples, "tusserver_webhook_deliveries_total", result="delivered") == 0
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    ("settings", "read_in"),
    [({"receive_min_bytes": MiB}, "thread"), ({"receive_threads": 0}, "event_loop")],
)
async def test_where_a_streamed_body_was_read_is_counted(
    make_server: ServerFactory,
    http: aiohttp.ClientSession,
    settings: dict[str, int],
    read_in: str,
) -> None:
    """A large body read straight from its socket counts as read in a thread; with no
    receiving threads the same body counts as read on the event loop. A small body is
    not streamed and counts in neither."""
    server = await make_server(**settings)
    before = await scrape(http, server.root)
    source = os.urandom(2 * MiB)
    url = await create_upload(http, server.url, len(source))
    assert (await patch(http, url, 0, source)).status == 204
    small = await create_upload(http, server.url, 5)
    assert (await patch(http, small, 0, b"hello")).status == 204
    after = await scrape(http, server.root)
    moved = {
        where: value(after, "tusserver_streamed_bodies_total", read_in=where)
        - value(before, "tusserver_streamed_bodies_total", read_in=where)
        for where in ("thread", "event_loop")
    }
    assert moved == {"thread": 0, "event_loop": 0} | {read_in: 1}
