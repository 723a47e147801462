"""The middlewares, outermost first: request id (kept or made; every answer echoes it) ->
CORS (every answer, errors included, reaches the browser) -> errors (a TusError becomes its
plain-text answer, or its problem+json body) -> method override -> protocol (tus 1.0.0 or
the resumable-upload draft) -> auth -> handler.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tusserver import auth, draft, protocol, randomness
from tusserver.errors import (
    InsufficientStorage,
    ServiceUnavailable,
    TusError,
    Unauthorized,
    UploadGone,
)
from tusserver.http import handlers
from tusserver.http.keys import DRAFT, ERROR_REASON, FORM, GRANT, METRICS, REQUEST_ID, SETTINGS
from tusserver.http.metrics import reason_of
from tusserver.protocol import split_host
from tusserver.settings import Settings, is_loopback_host

log = logging.getLogger("tusserver")

TUS_ROUTES = frozenset({"tus-collection-bare", "tus-collection", "tus-upload"})
BATCH_ROUTES = frozenset({"tus-batches", "tus-batch", "tus-batch-seal"})
COLLECTION_ROUTES = frozenset({"tus-collection-bare", "tus-collection"})
SAFE_METHODS = frozenset({"GET", "HEAD"})
TUS_METHODS = frozenset({"POST", "HEAD", "PATCH", "DELETE"})
CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, Tus-Resumable, Upload-Length, Upload-Offset, "
    "Upload-Metadata, Upload-Defer-Length, Upload-Concat, Upload-Checksum, "
    "X-HTTP-Method-Override, X-Requested-With, Cache-Control, Upload-Complete, "
    "Upload-Incomplete, Upload-Draft-Interop-Version, Content-Digest, Repr-Digest, "
    "Want-Repr-Digest, Content-Disposition, X-Request-Id"
)
CORS_EXPOSE_HEADERS = (
    "Location, Upload-Offset, Upload-Length, Upload-Metadata, Upload-Defer-Length, "
    "Upload-Expires, Upload-Concat, Repr-Digest, Tus-Resumable, Tus-Version, Tus-Extension, "
    "Tus-Max-Size, Tus-Checksum-Algorithm, Retry-After, Content-Disposition, Content-Range, "
    "ETag, WWW-Authenticate, Upload-Complete, Upload-Incomplete, Upload-Limit, "
    "Upload-Draft-Interop-Version, Accept-Patch, X-Request-Id"
)
CORS_ALLOW_METHODS = "GET, HEAD, POST, PATCH, DELETE, OPTIONS"


def _is_tus_route(request: web.Request) -> bool:
    return request.match_info.route.name in TUS_ROUTES


def _allowed_origin(settings: Settings, origin: str) -> bool:
    """--cors-origins, or without them in development mode the loopback origins only (a web
    page from elsewhere must not reach a developer's uploads)."""
    if "*" in settings.cors_origins or origin.rstrip("/") in settings.cors_origins:
        return True
    return not settings.is_secured and not settings.cors_origins and _is_loopback_origin(origin)


def _is_loopback_origin(origin: str) -> bool:
    scheme, _, rest = origin.partition("://")
    name = split_host(rest.rstrip("/"))[0]
    return scheme in ("http", "https") and bool(name) and is_loopback_host(name)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request gets an id before anything else runs: the client's `X-Request-Id` when
    it is a short token (protocol.parse_request_id), else a new random one. The access log
    shows it, every answer carries it back (`echo_request_id`), and the events the request
    causes name it (`protocol.current_request_id`, read by the store)."""
    given = protocol.parse_request_id(request.headers.get("X-Request-Id"))
    request[REQUEST_ID] = given if given is not None else randomness.token_hex(16)
    serving = protocol.current_request_id.set(request[REQUEST_ID])  # for the events it causes
    try:
        return await handler(request)
    finally:
        protocol.current_request_id.reset(serving)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """(on_response_prepare) Every answer, refusals included, names its request's id."""
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        response.headers["X-Request-Id"] = request_id


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
    """Render refusals as short plain-text answers; anything unexpected is a logged 500.
    Each refusal's kind is noted for the metrics (`ERROR_REASON`, counted by the access log)."""
    try:
        return await handler(request)
    except TusError as error:
        if isinstance(error, InsufficientStorage) and METRICS in request.app:
            request.app[METRICS].disk_full.inc()
        request[ERROR_REASON] = reason_of(error)
        status = _status_of(request, error)
        return _refusal(request, status, error.reason, error.headers, error.problem)
    except (RedisConnectionError, RedisTimeoutError, ConnectionRefusedError) as error:
        log.warning("Redis unreachable: %s", error)
        return _redis_unavailable(request, "is unreachable")
    except ResponseError as error:
        if not _refuses_writes(error):
            raise
        log.warning("Redis refuses writes: %s", error)
        return _redis_unavailable(request, "takes no writes now")
    except web.HTTPException as error:
        if error.status < 400:
            raise
        request[ERROR_REASON] = reason_of(error)
        return _refusal(request, error.status, error.reason, {})
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        request[ERROR_REASON] = "internal_error"
        return _refusal(request, 500, "internal server error", {})


def _redis_unavailable(request: web.Request, why: str) -> web.Response:
    """503 with Retry-After: the state store cannot be used now (`why`), counted."""
    if METRICS in request.app:
        request.app[METRICS].redis_errors.inc()
    request[ERROR_REASON] = "redis_unavailable"
    unavailable = ServiceUnavailable(f"the state store (Redis) {why}; retry later")
    return _refusal(request, 503, unavailable.reason, unavailable.headers)


# Redis refusing a command for a while, not for what it was asked: its disk failed (MISCONF:
# an AOF or snapshot write), memory is full (OOM), it is loading, a replica, or a cluster is
# reconfiguring. Any other error reply is a bug of ours (500).
_PASSING_REFUSALS = (
    BusyLoadingError, ClusterDownError, MasterDownError, OutOfMemoryError, ReadOnlyError,
    TryAgainError,
)  # fmt: skip


def _refuses_writes(error: ResponseError) -> bool:
    return isinstance(error, _PASSING_REFUSALS) or str(error).startswith(
        ("MISCONF", "NOREPLICAS", "BUSY ")
    )


def _status_of(request: web.Request, error: TusError) -> int:
    """The status of a refusal: its own, but --gone-status (404 by default) for the owner of
    a terminated or expired upload, so stock mobile clients start over by themselves."""
    if isinstance(error, UploadGone):
        return request.app[SETTINGS].gone_status
    return error.status


def _refusal(
    request: web.Request,
    status: int,
    reason: str,
    headers: dict[str, str],
    problem: dict[str, object] | None = None,
) -> web.Response:
    if problem is None:
        response = web.Response(status=status, text=reason + "\n", headers=headers)
    else:  # the draft's problem types (RFC 9457)
        body = json.dumps({**problem, "detail": reason})
        response = web.Response(
            status=status, text=body, content_type="application/problem+json", headers=headers
        )
    if _is_tus_route(request) and DRAFT not in request:
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
    """Tells the protocols apart before anything else: a request with `Tus-Resumable` (or
    none of the draft's fields) is tus 1.0.0 and must name a supported version (412); one
    with the draft's fields and no `Tus-Resumable` is the resumable-upload draft; a POST to
    the collection with a `multipart/form-data` body and no `Tus-Resumable` is a form upload
    (a browser form, `curl -F`)."""
    if not _is_tus_route(request):
        return await handler(request)
    protocol.check_single_values(lambda name: request.headers.getall(name, []))
    version = draft.classify(request.headers)
    if version is not None:
        request[DRAFT] = version
    elif _is_form_upload(request):
        request[FORM] = True
    elif request.method in TUS_METHODS:
        protocol.check_tus_resumable(request.headers.get("Tus-Resumable"))
    return await handler(request)


def _is_form_upload(request: web.Request) -> bool:
    return (
        request.method == "POST"
        and request.match_info.route.name in COLLECTION_ROUTES
        and "Tus-Resumable" not in request.headers
        and request.content_type == "multipart/form-data"
    )


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every tus, download or batch request but OPTIONS carries a grant (a token's, or anonymous's
    in development mode); refusals (401) happen before any handler runs. The one exception:
    a HEAD, PATCH or DELETE of one upload (tus or draft) whose token is past its `exp` but
    may finish what it created (the `fin` claim) gets an `expired` grant, and the upload
    service decides, once it knows the upload, whether it is that token's own and still
    uploading. With --token-cookie, a request without `Authorization` may carry its token in
    that cookie (`_headers_with_cookie_token`)."""
    route = request.match_info.route.name
    if (route in TUS_ROUTES or route in BATCH_ROUTES) and request.method != "OPTIONS":
        one_upload = route == "tus-upload"
        request[GRANT] = auth.grant_for_request(
            request.method, _headers_with_cookie_token(request), request.query,
            request.app[SETTINGS].secrets, may_finish=one_upload,
        )  # fmt: skip
    return await handler(request)


def _headers_with_cookie_token(request: web.Request) -> Mapping[str, str]:
    """The request's headers, with the --token-cookie token as `Authorization` when there is
    no header. Browsers send cookies by themselves, so the cookie counts only from a page of
    an origin named in --cors-origins or of the server's own (its `Origin`, else its
    `Referer`); a GET or HEAD that names neither (a link followed, a download) may use it,
    any other method gets 401: a form posted from elsewhere never acts with the cookie."""
    name = request.app[SETTINGS].token_cookie
    token = request.cookies.get(name) if name else None
    if token is None or "Authorization" in request.headers:
        return request.headers
    source = _source_origin(request)
    if source is None and request.method not in SAFE_METHODS:
        raise Unauthorized("a cookie token needs the request's Origin or Referer")
    if source is not None and not _may_use_cookie_from(request, source):
        raise Unauthorized("a cookie token is accepted only from an allowed origin")
    headers = CIMultiDict(request.headers)
    headers["Authorization"] = f"Bearer {token}"
    return headers


def _source_origin(request: web.Request) -> str | None:
    """The origin of the page that sent the request: `Origin`, else `Referer`'s origin."""
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin.rstrip("/")
    referer = request.headers.get("Referer")
    if referer is None:
        return None
    scheme, _, rest = referer.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if rest else "null"


def _may_use_cookie_from(request: web.Request, origin: str) -> bool:
    """Whether `origin` is named in --cors-origins (`*` does not count) or is this server's."""
    if origin in request.app[SETTINGS].cors_origins:
        return True
    scheme, _, rest = handlers.location_of(request).partition("://")
    return origin == f"{scheme}://{rest.split('/', 1)[0]}"


async def expect_handler(request: web.Request) -> None:
    """The answer to `Expect`, on every route: 417 for anything but `100-continue`, and no
    `100 Continue` yet: the tus handlers send it once every check before the body passed
    (handlers.body_of), so a refusal never invites the body; other routes take no body."""
    if request.headers.get("Expect", "").strip().lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="only Expect: 100-continue is understood")
