"""GET /metrics: Prometheus text counting real uploads on real servers: requests by method
and status class, bytes, uploads created/completed/terminated, open connections, PATCH time,
disk-full refusals; the bearer token; --no-metrics; and two workers summed in one scrape."""

from __future__ import annotations

import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import StartProcess, start_server
from tests.support.raw_http import exchange
from tests.support.servers import Server, ServerFactory
from tests.support.tus import TUS, create_upload, patch_headers

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
