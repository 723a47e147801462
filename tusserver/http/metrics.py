"""Prometheus metrics of one process (`GET /metrics`, prometheus-client's aiohttp handler).

prometheus-client is imported when the app is built, never when this module is: under
--workers the supervisor sets PROMETHEUS_MULTIPROC_DIR before forking, and the library picks
its multiprocess mode at its first import, which then happens in each worker. A scrape of
any worker then answers the sum over all of them (`MultiProcessCollector`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
PATCH_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
UPLOAD_EVENTS = ("created", "completed", "terminated", "expired")


class Metrics:
    """The counters of one process, each in its own registry (so several apps in one
    process, as in the tests, never collide)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        registry = CollectorRegistry(auto_describe=True)
        self.registry = registry
        self.requests: Counter = Counter(
            "tusserver_requests", "Requests answered, by method and status class (2xx...)",
            ["method", "status"], registry=registry,
        )  # fmt: skip
        self.bytes_received: Counter = Counter(
            "tusserver_bytes_received", "Upload bytes received and committed", registry=registry
        )
        self.uploads: dict[str, Counter] = {
            event: Counter(f"tusserver_uploads_{event}", f"Uploads {event}", registry=registry)
            for event in UPLOAD_EVENTS
        }
        self.connections_open: Gauge = Gauge(
            "tusserver_connections_open", "Open client connections",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.patch_seconds: Histogram = Histogram(
            "tusserver_patch_duration_seconds", "Time to answer a PATCH",
            buckets=PATCH_SECONDS_BUCKETS, registry=registry,
        )  # fmt: skip
        self.redis_errors: Counter = Counter(
            "tusserver_redis_errors", "Requests answered 503 because Redis failed",
            registry=registry,
        )  # fmt: skip
        self.disk_full: Counter = Counter(
            "tusserver_disk_full_refusals", "Writes refused with 507 (disk full or below "
            "--min-free-disk)", registry=registry,
        )  # fmt: skip

    def count_upload(self, event: str, committed_bytes: int) -> None:
        """(the upload state's observer) An upload event, or bytes committed (event "")."""
        if committed_bytes > 0:
            self.bytes_received.inc(committed_bytes)
        if event in self.uploads:
            self.uploads[event].inc()

    def count_connections(self, change: int) -> None:
        self.connections_open.inc(change)

    def count_request(self, method: str, status: int, time_s: float) -> None:
        self.requests.labels(method=method, status=f"{status // 100}xx").inc()
        if method == "PATCH":
            self.patch_seconds.observe(time_s)

    def handler(self, token: str | None) -> Handler:
        """GET /metrics: this process's registry, or with PROMETHEUS_MULTIPROC_DIR set every
        worker's, summed; with `token`, only for `Authorization: Bearer <token>` (else 401)."""
        from prometheus_client import CollectorRegistry, multiprocess
        from prometheus_client.aiohttp import make_aiohttp_handler

        if os.environ.get(MULTIPROC_DIR_VARIABLE):
            summed = CollectorRegistry()
            multiprocess.MultiProcessCollector(summed)  # type: ignore[no-untyped-call]
            serve = make_aiohttp_handler(summed, disable_compression=True)
        else:
            serve = make_aiohttp_handler(self.registry, disable_compression=True)

        async def metrics(request: web.Request) -> web.StreamResponse:
            if token is not None and not _bears(request, token):
                return web.Response(
                    status=401,
                    text="/metrics needs its bearer token (--metrics-token)\n",
                    headers={"WWW-Authenticate": 'Bearer realm="metrics"'},
                )
            return await serve(request)

        return metrics


def _bears(request: web.Request, token: str) -> bool:
    import hmac

    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)
