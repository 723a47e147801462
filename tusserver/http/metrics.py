"""Prometheus metrics of one process (`GET /metrics`, prometheus-client's aiohttp handler).

prometheus-client is imported when the app is built, never when this module is: under
--workers the supervisor sets PROMETHEUS_MULTIPROC_DIR before forking, and the library picks
its multiprocess mode at its first import, which then happens in each worker. A scrape of
any worker then answers the sum over all of them (`MultiProcessCollector`).
"""

from __future__ import annotations

import os
import re
from http import HTTPStatus
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
PATCH_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800)
UPLOAD_EVENTS = ("created", "completed", "terminated", "expired")
_WORD_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


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
        self.errors: Counter = Counter(
            "tusserver_errors", "4xx and 5xx answers, by status and reason (the refusal's "
            "kind, never the client's text)", ["status", "reason"], registry=registry,
        )  # fmt: skip
        self.lock_waits: Counter = Counter(
            "tusserver_lock_waits", "Requests that found their upload locked by another "
            "request and waited, by result (acquired, or locked: answered 423)",
            ["result"], registry=registry,
        )  # fmt: skip
        self.lock_takeovers: Counter = Counter(
            "tusserver_lock_takeovers", "Locks taken from a running request that was asked "
            "to stop", registry=registry,
        )  # fmt: skip
        self.webhook_deliveries: Counter = Counter(
            "tusserver_webhook_deliveries", "Webhook tries, by result (delivered, refused: a "
            "non-2xx answer, timeout, unreachable)", ["result"], registry=registry,
        )  # fmt: skip
        self.dead_lettered: Counter = Counter(
            "tusserver_events_dead_lettered", "Events moved to the dead-letter stream after "
            "their last try", registry=registry,
        )  # fmt: skip
        self.pre_create_checks: Counter = Counter(
            "tusserver_pre_create_checks", "Pre-create questions to the parent, by result "
            "(accepted, refused, failed)", ["result"], registry=registry,
        )  # fmt: skip
        self.streamed_bodies: Counter = Counter(
            "tusserver_streamed_bodies", "Bodies streamed onto uploads, by where they were "
            "read: thread (straight from the socket, --receive-threads) or event_loop",
            ["read_in"], registry=registry,
        )  # fmt: skip
        self.uploads_in_flight: Gauge = Gauge(
            "tusserver_uploads_in_flight", "Requests writing bytes onto an upload right now",
            registry=registry, multiprocess_mode="livesum",
        )  # fmt: skip

    def count_upload(self, event: str, committed_bytes: int) -> None:
        """(the upload state's observer) An upload event, or bytes committed (event "")."""
        if committed_bytes > 0:
            self.bytes_received.inc(committed_bytes)
        if event in self.uploads:
            self.uploads[event].inc()

    def count_connections(self, change: int) -> None:
        self.connections_open.inc(change)

    def count_request(self, method: str, status: int, time_s: float, reason: str = "") -> None:
        """One answered request; a 4xx or 5xx also as an error with its `reason` (see
        `reason_of`), or the status's own name when nothing said why."""
        self.requests.labels(method=method, status=f"{status // 100}xx").inc()
        if method == "PATCH":
            self.patch_seconds.observe(time_s)
        if status >= 400:
            self.errors.labels(status=str(status), reason=reason or _status_name(status)).inc()

    def count_lock(self, result: str) -> None:
        """(the service's lock observer) "takeover", or a wait's result: "acquired", "locked"."""
        if result == "takeover":
            self.lock_takeovers.inc()
        else:
            self.lock_waits.labels(result=result).inc()

    def count_in_flight(self, change: int) -> None:
        self.uploads_in_flight.inc(change)

    def count_streamed(self, read_in: str) -> None:
        """(the service's observer) A streamed body starts: "thread" or "event_loop"."""
        self.streamed_bodies.labels(read_in=read_in).inc()

    def count_webhook(self, result: str) -> None:
        """(event delivery's observer) One try's result, or "dead_lettered"."""
        if result == "dead_lettered":  # events.delivery.DEAD_LETTERED
            self.dead_lettered.inc()
        else:
            self.webhook_deliveries.labels(result=result).inc()

    def count_pre_create(self, result: str) -> None:
        self.pre_create_checks.labels(result=result).inc()

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


def reason_of(error: BaseException) -> str:
    """The reason label of a refusal: its class, in snake case (`OffsetMismatch` ->
    `offset_mismatch`, aiohttp's `HTTPNotFound` -> `not_found`). Classes are few and fixed,
    so the label stays of bounded cardinality whatever clients send."""
    name = type(error).__name__.removeprefix("HTTP")
    return _WORD_BOUNDARY.sub("_", name).lower()


def _status_name(status: int) -> str:
    """`request_header_fields_too_large` for 431: the reason of an answer nothing named (the
    HTTP parser's refusals, a handler's own 401)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "other"
    return re.sub(r"[^a-z0-9]+", "_", phrase.lower()).strip("_")


def _bears(request: web.Request, token: str) -> bool:
    import hmac

    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), token)
