"""Build the aiohttp Application: routes, middlewares, and the resources it owns.

Middlewares, outermost first: CORS (every answer, errors included, reaches the browser) ->
errors (a TusError becomes its plain-text answer) -> method override -> Tus-Resumable ->
auth -> handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.typedefs import Handler
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tusserver import auth, demo, events, expiry, handlers, parent, protocol
from tusserver.errors import ServiceUnavailable, TusError
from tusserver.keys import GRANT, PRE_CREATE, REDIS_URL, SETTINGS, UPLOADS
from tusserver.redis_client import connect as connect_redis
from tusserver.settings import Settings
from tusserver.state import UploadState
from tusserver.storage import Storage
from tusserver.tasks import cancel_and_wait
from tusserver.uploads import Uploads

log = logging.getLogger("tusserver")

TUS_ROUTES = frozenset({"tus-collection-bare", "tus-collection", "tus-upload"})
TUS_METHODS = frozenset({"POST", "HEAD", "PATCH", "DELETE"})
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Offset, "
    "Upload-Metadata, Upload-Defer-Length, Upload-Concat, Upload-Checksum, "
    "X-HTTP-Method-Override, X-Requested-With, Cache-Control"
)
CORS_EXPOSE_HEADERS = (
    "Location, Upload-Offset, Upload-Length, Upload-Metadata, Upload-Defer-Length, "
    "Upload-Expires, Upload-Concat, Repr-Digest, Tus-Resumable, Tus-Version, Tus-Extension, "
    "Tus-Max-Size, Tus-Checksum-Algorithm, Retry-After, Content-Disposition, Content-Range, "
    "ETag, WWW-Authenticate"
)
CORS_ALLOW_METHODS = "GET, HEAD, POST, PATCH, DELETE, OPTIONS"
# aiohttp refuses header lines past this itself; protocol.py refuses Upload-Metadata and
# Upload-Concat values past its own (smaller) documented limit with a clear 400.
MAX_HEADER_FIELD_BYTES = 128 * 1024
# Bytes a request body may buffer before aiohttp pauses the socket (twice this at most):
# larger reads mean fewer wake-ups per MiB; memory per request stays a few MiB.
READ_BUFFER_BYTES = 512 * 1024


def _is_tus_route(request: web.Request) -> bool:
    return request.match_info.route.name in TUS_ROUTES


def _allowed_origin(settings: Settings, origin: str) -> bool:
    if "*" in settings.cors_origins or origin.rstrip("/") in settings.cors_origins:
        return True
    return not settings.is_secured and not settings.cors_origins


@web.middleware
async def cors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    settings = request.app[SETTINGS]
    origin = request.headers.get("Origin")
    if origin is None or not _allowed_origin(settings, origin):
        return await handler(request)
    headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
    if origin.rstrip("/") in settings.cors_origins:  # credentials only for explicit origins
        headers["Access-Control-Allow-Credentials"] = "true"
    preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
    if preflight:
        headers |= {
            "Access-Control-Allow-Methods": CORS_ALLOW_METHODS,
            "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
            "Access-Control-Max-Age": "86400",
        }
        return web.Response(status=204, headers=headers)
    headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS
    try:
        response = await handler(request)
    except web.HTTPException as error:
        error.headers.update(headers)
        raise
    response.headers.update(headers)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render refusals as short plain-text answers; anything unexpected is a logged 500."""
    try:
        return await handler(request)
    except TusError as error:
        return _refusal(request, error.status, error.reason, error.headers)
    except (RedisConnectionError, RedisTimeoutError, ConnectionRefusedError) as error:
        log.warning("Redis unreachable: %s", error)
        unavailable = ServiceUnavailable("the state store (Redis) is unreachable; retry later")
        return _refusal(request, 503, unavailable.reason, unavailable.headers)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return _refusal(request, error.status, error.reason, {})
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        return _refusal(request, 500, "internal server error", {})


def _refusal(
    request: web.Request, status: int, reason: str, headers: dict[str, str]
) -> web.Response:
    response = web.Response(status=status, text=reason + "\n", headers=headers)
    if _is_tus_route(request):
        response.headers["Tus-Resumable"] = protocol.TUS_VERSION
    expects_continue = request.headers.get("Expect", "").lower() == "100-continue"
    if expects_continue or status >= 500 or not request.content.is_eof():
        response.force_close()  # the body was not (all) read: don't reuse the connection
        response.headers["Connection"] = "close"
    return response


@web.middleware
async def method_override_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """`X-HTTP-Method-Override` replaces the method before anything else looks at it."""
    override = protocol.parse_method_override(request.headers.get("X-HTTP-Method-Override"))
    if override is not None and override != request.method:
        request = request.clone(method=override)
    return await handler(request)


@web.middleware
async def tus_resumable_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if _is_tus_route(request) and request.method in TUS_METHODS:
        protocol.check_tus_resumable(request.headers.get("Tus-Resumable"))
    return await handler(request)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every tus or download request but OPTIONS carries a grant (a token's, or anonymous's
    in development mode); refusals (401) happen before any handler runs."""
    if _is_tus_route(request) and request.method != "OPTIONS":
        request[GRANT] = auth.grant_for_request(
            request.method, request.headers, request.query, request.app[SETTINGS].secrets
        )
    return await handler(request)


async def _no_automatic_continue(request: web.Request) -> None:
    """aiohttp answers `Expect: 100-continue` before any check; handlers do it themselves
    after their checks (handlers.continue_body)."""


async def health(request: web.Request) -> web.Response:
    """200 when Redis answers, 503 otherwise."""
    await request.app[UPLOADS].state.ping()
    return web.json_response({"status": "ok"})


async def _redis_context(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    client = await connect_redis(app[REDIS_URL])
    state = UploadState(client, tombstone_ttl_s=settings.tombstone_ttl_s)
    await state.check_layout()
    storage = Storage(
        settings.data_dir, fsync=settings.fsync, min_free_disk_bytes=settings.min_free_disk_bytes
    )
    storage.prepare()
    app[UPLOADS] = Uploads(state, storage, settings)
    yield
    await app[UPLOADS].close()
    storage.close()
    await client.aclose()


async def _stop_writers(app: web.Application) -> None:
    """On shutdown (after the listener closed): running PATCHes commit and answer 503."""
    if UPLOADS in app:
        app[UPLOADS].stop_writers()


async def _sweeper_context(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(expiry.sweep_forever(app[UPLOADS], app[SETTINGS].sweep_interval_s))
    yield
    await cancel_and_wait(task)


def build_app(settings: Settings, redis_url: str) -> web.Application:
    """The tus application for `settings`, using the Redis at `redis_url`."""
    app = web.Application(
        middlewares=[
            cors_middleware,
            error_middleware,
            method_override_middleware,
            tus_resumable_middleware,
            auth_middleware,
        ],
        handler_args={"max_field_size": MAX_HEADER_FIELD_BYTES, "read_bufsize": READ_BUFFER_BYTES},
    )
    app[SETTINGS] = settings
    app[REDIS_URL] = redis_url
    base = settings.base_path
    continue_handler = _no_automatic_continue
    app.router.add_route(
        "*", base.rstrip("/") or "/", handlers.collection, name="tus-collection-bare",
        expect_handler=continue_handler,
    )  # fmt: skip
    app.router.add_route(
        "*", base, handlers.collection, name="tus-collection", expect_handler=continue_handler
    )
    app.router.add_route(
        "*", base + "{upload_id}", handlers.upload, name="tus-upload",
        expect_handler=continue_handler,
    )  # fmt: skip
    app.router.add_get("/health", health, name="health")
    demo.add_demo_routes(app, settings)
    app.on_shutdown.append(_stop_writers)
    app.cleanup_ctx.append(_redis_context)
    app.cleanup_ctx.append(_sweeper_context)
    app[PRE_CREATE] = parent.PreCreateCheck(settings)
    app.cleanup_ctx.append(events.events_context(settings, redis_url, app[PRE_CREATE]))
    return app


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path without its query (tokens live there), status,
    bytes, milliseconds, upload id. JSON when --log-json."""

    json_lines = False

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_s: float) -> None:
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "bytes_in": request.content_length or 0,
            "bytes_out": response.body_length,
            "ms": round(time_s * 1000, 1),
            "upload_id": getattr(request, "match_info", {}).get("upload_id", ""),
        }
        if self.json_lines:
            self.logger.info(json.dumps({"time": time.time(), **fields}))
        else:
            self.logger.info(
                "%(method)s %(path)s %(status)s in=%(bytes_in)s out=%(bytes_out)s "
                "%(ms)sms %(upload_id)s",
                fields,
            )


class JsonAccessLogger(AccessLogger):
    json_lines = True
