"""Build the aiohttp Application: routes, middlewares (middleware.py), and the resources it
owns, each one `cleanup_ctx` entry: the upload service, the expiry sweeper, event delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from tusserver.aiohttp_private import ConnectionLimits, GuardedAppRunner, close_after_taken_body
from tusserver.events import delivery as events
from tusserver.events import parent
from tusserver.http import batch_handlers, demo, routes
from tusserver.http.access_log import AccessLogger, counting
from tusserver.http.keys import METRICS, PRE_CREATE, REDIS_URL, SETTINGS, UPLOADS
from tusserver.http.metrics import Metrics
from tusserver.http.middleware import (
    auth_middleware,
    cors_middleware,
    echo_request_id,
    error_middleware,
    expect_handler,
    method_override_middleware,
    request_id_middleware,
    tus_resumable_middleware,
)
from tusserver.settings import Settings
from tusserver.tasks import cancel_and_wait
from tusserver.uploads import expiry
from tusserver.uploads.service import Observers, open_uploads

# Bytes a request body may buffer before aiohttp pauses the socket (twice this at most):
# larger reads mean fewer wake-ups per MiB, but 16 streams per worker hold 32 times this;
# 256 KiB kept 32 concurrent uploads under 100 MiB per process at the same speed as 512 KiB
# (benchmarks/README.md).
READ_BUFFER_BYTES = 256 * 1024


async def health(request: web.Request) -> web.Response:
    """200 when Redis answers, 503 otherwise."""
    await request.app[UPLOADS].ping()
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """200 when this process should be sent uploads, else 503 naming the checks that failed
    (a draining process is not ready at once); no token, for load balancers."""
    readiness = await request.app[UPLOADS].readiness()
    body = {
        "status": "ready" if readiness.is_ready else "not ready",
        "checks": readiness.checks,
        "failed": readiness.failed,
    }
    return web.json_response(body, status=200 if readiness.is_ready else 503)


async def _uploads_context(app: web.Application) -> AsyncIterator[None]:
    metrics = app.get(METRICS)
    observers = Observers()
    if metrics is not None:
        observers = Observers(
            upload=metrics.count_upload, lock=metrics.count_lock,
            in_flight=metrics.count_in_flight, streamed=metrics.count_streamed,
        )  # fmt: skip
    async with open_uploads(app[SETTINGS], app[REDIS_URL], observers) as uploads:
        app[UPLOADS] = uploads
        yield


def start_draining(app: web.Application) -> None:
    """The process is going to stop: /ready answers 503 from now on (load balancers stop
    sending), while the listener still serves what comes."""
    if UPLOADS in app:
        app[UPLOADS].drain()


async def _stop_writers(app: web.Application) -> None:
    """On shutdown (after the listener closed): running PATCHes commit and answer 503."""
    if UPLOADS in app:
        app[UPLOADS].stop_writers()


async def _sweeper_context(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(expiry.sweep_forever(app[UPLOADS], app[SETTINGS].sweep_interval_s))
    yield
    await cancel_and_wait(task)


def make_runner(
    app: web.Application, access_log_class: type[AccessLogger], shutdown_timeout_s: float
) -> web.AppRunner:
    """The runner that serves `app` with the connection limits of its settings (header size
    and time, open connections), as the supervisor and the tests serve it."""
    settings = app[SETTINGS]
    metrics = app.get(METRICS)
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout_s=settings.header_timeout_s,
        max_connections=settings.max_connections,
        count_connection=metrics.count_connections if metrics is not None else None,
    )
    if metrics is not None:
        access_log_class = counting(access_log_class, metrics)
    return GuardedAppRunner(
        app,
        limits=limits,
        access_log_class=access_log_class,
        handle_signals=False,
        shutdown_timeout=shutdown_timeout_s,
    )


def build_app(settings: Settings, redis_url: str) -> web.Application:
    """The tus application for `settings`, using the Redis at `redis_url`."""
    app = web.Application(
        middlewares=[
            request_id_middleware,
            cors_middleware,
            error_middleware,
            method_override_middleware,
            tus_resumable_middleware,
            auth_middleware,
        ],
        handler_args={
            # No header line may be longer than a whole header block (--max-header-size);
            # protocol.py refuses Upload-Metadata and Upload-Concat values past its own
            # (smaller) documented limit with a clear 400.
            "max_field_size": settings.max_header_bytes,
            # Upload bodies are raw bytes: never decode a Content-Encoding (the handlers refuse
            # one with 415); decoding costs CPU and memory before any check (a 1 MiB gzip
            # bomb is a GiB) and would make offsets count bytes the client did not send.
            "auto_decompress": False,
            "keepalive_timeout": settings.keepalive_timeout_s,
            "read_bufsize": READ_BUFFER_BYTES,
        },
    )
    app[SETTINGS] = settings
    app[REDIS_URL] = redis_url
    base = settings.base_path
    continue_handler = expect_handler
    app.router.add_route(
        "*", base.rstrip("/") or "/", routes.collection, name="tus-collection-bare",
        expect_handler=continue_handler,
    )  # fmt: skip
    app.router.add_route(
        "*", base, routes.collection, name="tus-collection", expect_handler=continue_handler
    )
    # The batch API (before the upload route, which would take `batches` for an id).
    for path, handler, name in (
        ("batches", batch_handlers.collection, "tus-batches"),
        ("batches/{name}", batch_handlers.batch, "tus-batch"),
        ("batches/{name}/seal", batch_handlers.seal_route, "tus-batch-seal"),
    ):
        app.router.add_route("*", base + path, handler, name=name, expect_handler=expect_handler)
    app.router.add_route(
        "*", base + "{upload_id}", routes.upload, name="tus-upload",
        expect_handler=continue_handler,
    )  # fmt: skip
    app.router.add_get("/health", health, name="health", expect_handler=expect_handler)
    app.router.add_get("/ready", ready, name="ready", expect_handler=expect_handler)
    if settings.metrics:
        app[METRICS] = Metrics()
        serve_metrics = app[METRICS].handler(settings.metrics_token)
        app.router.add_get("/metrics", serve_metrics, name="metrics", expect_handler=expect_handler)
    demo.add_demo_routes(app, settings)
    app.on_response_prepare.append(echo_request_id)
    app.on_response_prepare.append(close_after_taken_body)
    app.on_shutdown.append(_stop_writers)
    app.cleanup_ctx.append(_uploads_context)
    app.cleanup_ctx.append(_sweeper_context)
    metrics = app.get(METRICS)
    if metrics is None:
        app[PRE_CREATE] = parent.PreCreateCheck(settings)
        app.cleanup_ctx.append(events.events_context(settings, redis_url, app[PRE_CREATE]))
    else:
        app[PRE_CREATE] = parent.PreCreateCheck(settings, metrics.count_pre_create)
        app.cleanup_ctx.append(
            events.events_context(settings, redis_url, app[PRE_CREATE], metrics.count_webhook)
        )
    return app
