"""One function per HTTP method of the tus endpoint; each reads as the protocol's steps.
Requests of the resumable-upload draft (told apart by the protocol middleware) go to
`draft_handlers` instead (`routes.py` chooses), which uses the helpers here.

No Redis command, file path or status arithmetic here: parsing lives in `protocol`, refusals
in `errors`, state and bytes behind `Uploads`. The method is the effective one, after
`X-HTTP-Method-Override` (app.py resolves it before routing reaches these functions).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from tusserver import draft, protocol
from tusserver.aiohttp_private import send_continue, take_body
from tusserver.auth import Grant
from tusserver.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    MethodNotAllowed,
    OffsetMismatch,
)
from tusserver.http.keys import DRAFT, GRANT, PRE_CREATE, SETTINGS, UPLOADS
from tusserver.uploads import concat
from tusserver.uploads.batches import Batches
from tusserver.uploads.service import Body, NewUpload, SizeLimit, Upload, Uploads

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

EXTENSIONS = (
    "creation",
    "creation-with-upload",
    "creation-defer-length",
    "expiration",
    "checksum",
    "termination",
    "concatenation",
)
LIST_PAGE_DEFAULT = 100
LIST_PAGE_MAX = 1000


def uploads(request: web.Request) -> Uploads:
    return request.app[UPLOADS]


def grant(request: web.Request) -> Grant:
    return request[GRANT]


def tus_headers(**values: str | int | None) -> dict[str, str]:
    """Response headers from keyword names (upload_offset -> Upload-Offset); None is left out."""
    headers = {"Tus-Resumable": protocol.TUS_VERSION}
    for name, value in values.items():
        if value is not None:
            headers["-".join(part.capitalize() for part in name.split("_"))] = str(value)
    return headers


def expires_header(upload: Upload) -> str | None:
    if upload.status != "uploading" or upload.expires_at is None:
        return None
    return protocol.format_http_date(upload.expires_at)


def body_of(request: web.Request) -> Body:
    """The request's body for the upload service, which answers `Expect: 100-continue` (the
    app turns aiohttp's automatic 100 off) only once every check before the body passed, so
    a refusal never invites the body."""

    async def continue_body() -> None:
        await send_continue(request)

    protocol.require_identity_encoding(request.headers.get("Content-Encoding"))
    return Body(
        stream=request.content,
        content_length=request.content_length,
        checksum=protocol.parse_checksum(request.headers.get("Upload-Checksum")),
        before_reading=continue_body,
        take=lambda: take_body(request),
    )


def size_limit(request: web.Request) -> SizeLimit:
    """The most bytes an upload may hold for this request: --max-size and the token's."""
    return SizeLimit.of(request.app[SETTINGS].max_size_bytes, grant(request).max_size_bytes)


def location_of(request: web.Request) -> str:
    """The absolute URL of the endpoint with an `{id}` placeholder, as the client sees it: from
    --public-url, else from the Host (or a trusted proxy's forwarded host) when it is one of
    --allowed-hosts (loopback names in development mode). 400 for any other host: the URL is
    stored and sent to the parent in events, so no client may choose where it points."""
    settings = request.app[SETTINGS]
    if settings.public_url:
        return settings.public_url.rstrip("/") + "/{id}"
    scheme, host, prefix = request.scheme, request.headers.get("Host", ""), ""
    if settings.behind_proxy:
        forwarded = request.forwarded[0] if request.forwarded else {}
        scheme = forwarded.get("proto") or request.headers.get("X-Forwarded-Proto") or scheme
        host = forwarded.get("host") or request.headers.get("X-Forwarded-Host") or host
        prefix = request.headers.get("X-Forwarded-Prefix", "")
    template = protocol.endpoint_template(scheme, host, prefix, settings.base_path)
    if not settings.is_allowed_host(template.split("://", 1)[1].split("/", 1)[0]):
        raise BadRequest("this server does not make upload URLs for that Host (--allowed-hosts)")
    return template


# -- the collection: OPTIONS, POST ---------------------------------------------------------


def draft_options_headers(request: web.Request) -> dict[str, str]:
    """What OPTIONS adds for draft clients, whatever protocol asked: `Accept-Patch` and the
    limits of a new upload (`min-size=0` when there are none)."""
    version = request.get(DRAFT, draft.NEWEST)
    value = draft.format_limits(
        version,
        max_size=request.app[SETTINGS].max_size_bytes,
        lifetime_s=request.app[SETTINGS].expire_after_s,
    )
    headers = {"Accept-Patch": draft.PARTIAL_UPLOAD}
    return headers if value is None else headers | {"Upload-Limit": value}


async def options(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    headers = tus_headers(
        tus_version=",".join(protocol.SUPPORTED_VERSIONS),
        tus_extension=",".join(EXTENSIONS),
        tus_max_size=settings.max_size_bytes,
        tus_checksum_algorithm=",".join(protocol.CHECKSUM_ALGORITHMS),
    )
    headers |= draft_options_headers(request)  # the same endpoint speaks the draft
    return web.Response(status=204, headers=headers)


async def post(request: web.Request) -> web.Response:
    """Creation (with upload): 201 with Location; 400/413 for bad or oversized lengths."""
    who = grant(request)
    who.require("create")
    length = protocol.parse_upload_length(request.headers.get("Upload-Length"))
    is_deferred = protocol.parse_defer_length(request.headers.get("Upload-Defer-Length"))
    concat = protocol.parse_concat(request.headers.get("Upload-Concat"))
    metadata = protocol.parse_metadata(request.headers.get("Upload-Metadata"))
    who.check_metadata(metadata)
    url_of = location_of(request)  # 400 for a Host this server makes no URLs for
    pre_create = request.app[PRE_CREATE]
    carries_body = has_body(request)
    if concat is not None and concat.is_final:
        if carries_body:
            raise BadRequest("a final upload takes no body: its bytes are its partial uploads'")
        partial_ids = _partial_ids(request, concat)
        await pre_create.check(who.subject, length, metadata, concat)
        return await _post_final(request, partial_ids, metadata, url_of)
    if length is None and not is_deferred:
        raise BadRequest("Upload-Length or Upload-Defer-Length: 1 is required")
    if length is not None and is_deferred:
        raise BadRequest("send either Upload-Length or Upload-Defer-Length, not both")
    limit = size_limit(request)
    limit.check(length)
    if carries_body:  # creation with upload: the body is the upload's first bytes
        protocol.require_offset_stream(request.headers.get("Content-Type"))
    body = body_of(request) if carries_body else None
    await pre_create.check(who.subject, length, metadata, concat)  # the parent's say: 403/503
    new = NewUpload(
        owner=who.subject,
        length=length,
        metadata=protocol.format_metadata(metadata),
        concat="partial" if concat is not None else "",
        url_of=url_of,
        created_by=who.created_by,  # a digest of a token that may finish it after its exp
        quota=who.batch_quota,  # a `batch` in the metadata joins it (uploads/batches.py)
    )
    created = await uploads(request).create(new, body, limit)
    upload = created.upload
    if created.refusal is not None:  # the upload exists: the client may resume it
        created.refusal.headers["Location"] = upload.url
        raise created.refusal
    return _created(upload)


def has_body(request: web.Request) -> bool:
    """Whether the request carries a body (a Content-Length above 0, or a chunked one)."""
    return request.body_exists and request.content_length != 0


def _partial_ids(request: web.Request, concat: protocol.Concat) -> list[str]:
    """The ids of a final upload's parts: uploads of this server, each named once, at most
    --max-concat-parts of them (400 otherwise)."""
    if request.headers.get("Upload-Length") is not None:
        raise BadRequest("a final upload takes its length from its partial uploads")
    settings = request.app[SETTINGS]
    base_path = settings.base_path
    if len(concat.partial_paths) > settings.max_concat_parts:
        raise BadRequest(f"a final upload may name at most {settings.max_concat_parts} parts")
    partial_ids = []
    for path in concat.partial_paths:
        if not path.startswith(base_path) or "/" in path[len(base_path) :]:
            raise BadRequest(f"{path} is not an upload of this server")
        partial_ids.append(path[len(base_path) :])
    if len(set(partial_ids)) < len(partial_ids):
        raise BadRequest("a final upload may name each partial upload once")
    return partial_ids


async def _post_final(
    request: web.Request, partial_ids: list[str], metadata: dict[str, bytes | None], url_of: str
) -> web.Response:
    """Concatenation: a final upload made of complete partial uploads of the same owner."""
    upload = await concat.concatenate(
        uploads(request),
        owner=grant(request).subject,
        partial_ids=partial_ids,
        metadata=protocol.format_metadata(metadata),
        url_of=url_of,
        limit=size_limit(request),
        quota=grant(request).batch_quota,
    )
    return _created(upload)


def _created(upload: Upload) -> web.Response:
    """201 for a new upload: where it is, its offset, expiry and Upload-Concat."""
    return web.Response(
        status=201,
        headers=tus_headers(
            location=upload.url,
            upload_offset=upload.offset,
            upload_expires=expires_header(upload),
            upload_concat=concat_header(upload),
        ),
    )


def concat_header(upload: Upload) -> str | None:
    """Upload-Concat of a stored upload; a final upload's parts are named by URLs made like
    its own (its URL, stored at creation, with each part's id in place of its own)."""
    if not upload.is_final:
        return "partial" if upload.is_partial else None
    endpoint = upload.url.removesuffix(upload.upload_id)
    urls = [endpoint + pid for pid in upload.concat.removeprefix("final;").split()]
    return protocol.format_concat(protocol.Concat(True, ()), urls)


# -- one upload: HEAD, PATCH, DELETE -------------------------------------------------------


async def head(request: web.Request) -> web.Response:
    """The committed offset (a running PATCH commits first), length, metadata, expiry."""
    upload_id = _own_upload_id(request, "upload", "read")
    who = grant(request)
    upload = await uploads(request).current(upload_id, who.subject, finishing=who.finishing)
    headers = tus_headers(
        upload_offset=upload.offset,
        upload_length=upload.length,
        upload_defer_length=1 if upload.length is None else None,
        upload_metadata=upload.metadata or None,
        upload_expires=expires_header(upload),
        upload_concat=concat_header(upload),
        cache_control="no-store",
    )
    if upload.sha256:
        headers["Repr-Digest"] = protocol.format_repr_digest(bytes.fromhex(upload.sha256))
    return web.Response(status=200, headers=headers)


async def patch(request: web.Request) -> web.Response:
    """Append the body at Upload-Offset: 204 with the new offset; 409 at a wrong offset."""
    upload_id = _own_upload_id(request, "upload")
    protocol.require_offset_stream(request.headers.get("Content-Type"))
    offset = protocol.parse_upload_offset(request.headers.get("Upload-Offset"))
    declared_length = protocol.parse_upload_length(request.headers.get("Upload-Length"))
    body = body_of(request)
    limit = size_limit(request)
    who = grant(request)
    async with uploads(request).writing(upload_id, who.subject, finishing=who.finishing) as session:
        upload = session.upload
        if upload.is_final:
            raise Forbidden("a final upload cannot be patched")
        if offset != upload.offset:
            raise OffsetMismatch(expected=upload.offset, got=offset)
        if declared_length is not None and declared_length != upload.length:
            limit.check(declared_length)
            await session.declare_length(declared_length)
        upload = await session.append(body, limit)  # small or streamed: the service decides
    return web.Response(
        status=204,
        headers=tus_headers(upload_offset=upload.offset, upload_expires=expires_header(upload)),
    )


async def delete(request: web.Request) -> web.Response:
    """Termination: 204, then --gone-status (404 or 410) with the reason for the owner while
    the tombstone lasts, 404 after."""
    upload_id = _own_upload_id(request, "delete")
    who = grant(request)
    await uploads(request).terminate(upload_id, who.subject, finishing=who.finishing)
    return web.Response(status=204, headers=tus_headers())


# -- the read side: GET of one upload, GET of the collection ----------------------------


async def download(request: web.Request) -> web.StreamResponse:
    """The bytes of a completed upload (Range supported); 409 while it is not complete."""
    upload_id = _own_upload_id(request, "read")
    upload = await uploads(request).get(upload_id, grant(request).subject)
    if upload.status != "completed":
        raise Conflict("this upload is not complete yet")
    metadata = protocol.parse_metadata(upload.metadata)
    filename = _text_or_none(metadata.get("filename") or metadata.get("name"))
    filetype = _text_or_none(metadata.get("filetype") or metadata.get("type"))
    headers = {
        "Content-Disposition": protocol.content_disposition(filename),
        "Content-Type": protocol.download_content_type(filetype),
        "X-Content-Type-Options": "nosniff",
        "Repr-Digest": protocol.format_repr_digest(bytes.fromhex(upload.sha256)),
        "Cache-Control": "private, no-cache",
    }
    return web.FileResponse(uploads(request).file_path(upload), headers=headers)


async def listing(request: web.Request) -> web.Response:
    """The requester's uploads as JSON, oldest first, `limit` at a time with a `cursor`;
    with `batch`, only the members of that batch."""
    who = grant(request)
    who.require("read")
    limit = protocol.parse_list_limit(request.query.get("limit"), LIST_PAGE_DEFAULT, LIST_PAGE_MAX)
    after = protocol.parse_list_cursor(request.query.get("cursor"))
    batch = request.query.get("batch")
    if batch is None:
        page = await uploads(request).list_owned(who.subject, after, limit)
    else:  # the uploads that hold a batch's paths now
        who.batch_quota.check_batch(batch)
        members = await Batches(uploads(request)).members(who.subject, batch)
        page = [u for u in members if after is None or (u.created_at, u.upload_id) > after]
        page = page[:limit]
    next_cursor = None
    if len(page) == limit:
        last = page[-1]
        next_cursor = protocol.format_list_cursor(last.created_at, last.upload_id)
    return web.json_response(
        {"uploads": [_listed(upload) for upload in page], "next_cursor": next_cursor},
        headers={"Cache-Control": "no-store"},
    )


def _listed(upload: Upload) -> dict[str, object]:
    metadata = protocol.parse_metadata(upload.metadata)
    return {
        "id": upload.upload_id,
        "url": upload.url,
        "length": upload.length,
        "offset": upload.offset,
        "state": upload.status,
        "metadata": protocol.metadata_text(metadata),
        "sha256": upload.sha256 or None,
        "batch_path": upload.batch_path or None,  # its path in its batch, if a member
        "created": upload.created_at,
        "expires": upload.expires_at,
    }


def _text_or_none(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


# -- dispatch ------------------------------------------------------------------------------

COLLECTION_METHODS: dict[str, Handler] = {"OPTIONS": options, "POST": post, "GET": listing}
UPLOAD_METHODS: dict[str, Handler] = {
    "OPTIONS": options,
    "GET": download,
    "HEAD": head,
    "PATCH": patch,
    "DELETE": delete,
}


async def collection(request: web.Request) -> web.StreamResponse:
    return await dispatch(request, COLLECTION_METHODS)


async def upload(request: web.Request) -> web.StreamResponse:
    return await dispatch(request, UPLOAD_METHODS)


async def dispatch(request: web.Request, methods: dict[str, Handler]) -> web.StreamResponse:
    """The method's handler's answer; 405 naming `methods` for any other method."""
    handler = methods.get(request.method)
    if handler is None:
        raise MethodNotAllowed(request.method, ", ".join(methods))
    return await handler(request)


def _own_upload_id(request: web.Request, *actions: str) -> str:
    """The upload id of the URL, after the token's action and upload-id checks (403/404)."""
    who = grant(request)
    who.require(*actions)
    upload_id = request.match_info["upload_id"]
    who.check_upload(upload_id)
    return upload_id
