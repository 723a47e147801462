"""The resumable-upload draft's methods on the tus endpoint: creation (POST), offset retrieval
(HEAD, and GET of an incomplete upload), append (PATCH) and cancellation (DELETE).

A draft upload is an ordinary upload: a length stays deferred until a request declares it
(`Upload-Length`, or the completing request: its offset plus its content), and the same
service writes, locks, hashes and expires it. What differs between interop versions is read
from the request's `draft.Version`, never tested here by number.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from aiohttp import web

from tusserver import draft, protocol
from tusserver.aiohttp_private import send_continue, send_interim, take_body
from tusserver.draft import CompletedUpload, DigestMismatch, InconsistentLength, Version
from tusserver.errors import (
    BadRequest,
    ChecksumMismatch,
    Forbidden,
    MethodNotAllowed,
    OffsetMismatch,
    TusError,
    UnsupportedMediaType,
)
from tusserver.http import handlers as tus
from tusserver.http.keys import DRAFT, GRANT, PRE_CREATE, SETTINGS
from tusserver.uploads.service import Body, NewUpload, Upload

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _version(request: web.Request) -> Version:
    return request[DRAFT]


def _is_complete(upload: Upload) -> bool:
    """Whether every byte of the upload is in (hashed yet or not)."""
    return upload.status != "uploading"


def _limits(request: web.Request, upload: Upload | None) -> dict[str, str]:
    """`Upload-Limit` for the version (none before draft -04): the most bytes this request's
    upload may hold, and the time it has left (a new upload's: --expire-after)."""
    settings = request.app[SETTINGS]
    if upload is None:
        lifetime: float | None = settings.expire_after_s
    elif upload.status == "uploading" and upload.expires_at is not None:
        lifetime = upload.expires_at - time.time()
    else:
        lifetime = None
    max_size = tus.size_limit(request).max_bytes if GRANT in request else None
    if max_size is None:
        max_size = settings.max_size_bytes
    value = draft.format_limits(_version(request), max_size=max_size, lifetime_s=lifetime)
    return {} if value is None else {"Upload-Limit": value}


def _state_headers(request: web.Request, upload: Upload) -> dict[str, str]:
    """What every answer about an upload says: offset, completeness, limits, digest."""
    headers = {"Upload-Offset": str(upload.offset)}
    headers |= draft.complete_headers(_version(request), _is_complete(upload))
    headers |= _limits(request, upload)
    if upload.sha256:
        headers["Repr-Digest"] = protocol.format_repr_digest(bytes.fromhex(upload.sha256))
    return headers


def _body(request: web.Request, before_reading: Callable[[], Awaitable[None]]) -> Body:
    """The request's content, checked against `Content-Digest` (or `Repr-Digest` when it is
    the whole representation) before anything of it is kept."""
    protocol.require_identity_encoding(request.headers.get("Content-Encoding"))
    return Body(
        stream=request.content,
        content_length=request.content_length if tus.has_body(request) else 0,
        checksum=None,
        before_reading=before_reading,
        take=lambda: take_body(request),
    )


def _with_digest(body: Body, request: web.Request, *, is_whole: bool) -> Body:
    checksum = draft.request_digest(request.headers, is_whole_representation=is_whole)
    return replace(body, checksum=checksum)


# -- creation -------------------------------------------------------------------------------


async def post(request: web.Request) -> web.Response:
    """Upload creation: 104 with Location and Upload-Limit once every check passed, then the
    content; 201 with Location, Upload-Offset and the completeness of the upload."""
    version = _version(request)
    who = tus.grant(request)
    who.require("create")
    headers = request.headers
    is_complete = draft.require_complete(version, headers)
    upload_length = draft.parse_non_negative(headers.get("Upload-Length"), "Upload-Length")
    content_length = request.content_length if tus.has_body(request) else 0
    length = draft.resolved_length(upload_length, is_complete, content_length, 0)
    metadata = draft.creation_metadata(headers)
    who.check_metadata(metadata)
    url_of = tus.location_of(request)  # 400 for a Host this server makes no URLs for
    limit = tus.size_limit(request)
    limit.check(length)
    service = tus.uploads(request)
    stored_metadata = protocol.format_metadata(metadata)
    upload_id = service.new_id(who.subject, stored_metadata)  # a batch's member: in its shard
    location = url_of.replace("{id}", upload_id)

    async def announce() -> None:  # every check has passed: the client may resume from now
        if version.interop is not None:  # never to a client that named no version
            interim = {"Location": location, draft.INTEROP_HEADER: str(version.interop)}
            await send_interim(request, 104, interim | _limits(request, None))
        await send_continue(request)

    body = _with_digest(_body(request, announce), request, is_whole=is_complete)
    await request.app[PRE_CREATE].check(who.subject, length, metadata, None)  # 403/503
    new = NewUpload(
        owner=who.subject,
        length=length,
        metadata=stored_metadata,
        concat="",
        url_of=url_of,
        upload_id=upload_id,
        quota=who.batch_quota,
    )
    created = await service.create(new, body if tus.has_body(request) else None, limit)
    upload = created.upload
    if created.refusal is not None:  # what arrived is kept: the client may resume
        created.refusal.headers["Location"] = upload.url
        raise created.refusal
    if is_complete and upload.length is None:  # content of unknown size: its end is the length
        upload = await _complete_at_offset(request, upload.upload_id)
    answer = {"Location": upload.url, **_state_headers(request, upload)}
    return web.Response(status=201, headers=answer)


async def _complete_at_offset(request: web.Request, upload_id: str) -> Upload:
    """Fix the length of a deferred upload at its offset, which completes it."""
    service, who = tus.uploads(request), tus.grant(request)
    async with service.writing(upload_id, who.subject) as session:
        upload = session.upload
        if upload.status != "uploading":
            return upload
        if upload.length is None:
            await session.declare_length(upload.offset)
        nothing = Body(stream=request.content, content_length=0, checksum=None)
        return await session.append(nothing, tus.size_limit(request))


# -- one upload -----------------------------------------------------------------------------


async def head(request: web.Request) -> web.Response:
    """Offset retrieval: Upload-Offset, completeness, Upload-Length when known, limits."""
    draft.check_no_upload_fields(_version(request), request.headers)
    upload_id = tus._own_upload_id(request, "upload", "read")
    upload = await tus.uploads(request).current(
        upload_id, tus.grant(request).subject, finishing=tus.grant(request).finishing
    )
    return _offset_answer(request, upload)


def _offset_answer(request: web.Request, upload: Upload) -> web.Response:
    headers = _state_headers(request, upload) | {"Cache-Control": "no-store"}
    if upload.length is not None:
        headers["Upload-Length"] = str(upload.length)
    return web.Response(status=204, headers=headers)


async def get(request: web.Request) -> web.StreamResponse:
    """GET of an incomplete upload retrieves its offset (as the newest draft allows); of a
    complete one, its bytes."""
    upload_id = tus._own_upload_id(request, "upload", "read")
    upload = await tus.uploads(request).current(
        upload_id, tus.grant(request).subject, finishing=tus.grant(request).finishing
    )
    if upload.status == "completed":
        return await tus.download(request)
    return _offset_answer(request, upload)


async def patch(request: web.Request) -> web.Response:
    """Append at Upload-Offset; the completing append fixes a length not known before."""
    version = _version(request)
    headers = request.headers
    upload_id = tus._own_upload_id(request, "upload")
    if version.requires_partial_upload and not draft.is_partial_upload(headers.get("Content-Type")):
        raise UnsupportedMediaType(f"Content-Type must be {draft.PARTIAL_UPLOAD}")
    offset = draft.parse_non_negative(headers.get("Upload-Offset"), "Upload-Offset")
    if offset is None:
        raise BadRequest("Upload-Offset is required")
    is_complete = draft.require_complete(version, headers)
    upload_length = draft.parse_non_negative(headers.get("Upload-Length"), "Upload-Length")
    body = _body(request, lambda: send_continue(request))
    body = _with_digest(body, request, is_whole=is_complete and offset == 0)
    declared = draft.resolved_length(upload_length, is_complete, body.content_length, offset)
    limit = tus.size_limit(request)
    who = tus.grant(request)
    async with tus.uploads(request).writing(
        upload_id, who.subject, finishing=who.finishing
    ) as session:
        upload = session.upload
        if upload.is_final:
            raise Forbidden("a final upload cannot be appended to")
        if offset != upload.offset:
            raise OffsetMismatch(expected=upload.offset, got=offset)
        if _is_complete(upload):
            if body.content_length != 0:
                raise CompletedUpload()
            return web.Response(status=204, headers=_state_headers(request, upload))
        if declared is not None and declared != upload.length:
            if upload.length is not None:
                raise InconsistentLength(f"the upload's length is {upload.length}, not {declared}")
            limit.check(declared)
            await session.declare_length(declared)
        upload = await session.append(body, limit)
    if is_complete and upload.length is None:  # chunked content: its end is the length
        upload = await _complete_at_offset(request, upload_id)
    return web.Response(status=204, headers=_state_headers(request, upload))


async def delete(request: web.Request) -> web.Response:
    """Cancellation: 204; the upload is gone for every later request."""
    version = _version(request)
    draft.check_no_upload_fields(version, request.headers)
    upload_id = tus._own_upload_id(request, "delete")
    await tus.uploads(request).terminate(
        upload_id, tus.grant(request).subject, finishing=tus.grant(request).finishing
    )
    headers = {} if version.interop is None else {draft.INTEROP_HEADER: str(version.interop)}
    return web.Response(status=204, headers=headers)


async def options(request: web.Request) -> web.Response:
    """The endpoint's one OPTIONS answer (tus's headers and the draft's)."""
    return await tus.options(request)


# -- dispatch -------------------------------------------------------------------------------

COLLECTION_METHODS: dict[str, Handler] = {"OPTIONS": options, "POST": post}
UPLOAD_METHODS: dict[str, Handler] = {
    "OPTIONS": options,
    "GET": get,
    "HEAD": head,
    "PATCH": patch,
    "DELETE": delete,
}


async def collection(request: web.Request) -> web.StreamResponse:
    return await _dispatch(request, COLLECTION_METHODS)


async def upload(request: web.Request) -> web.StreamResponse:
    return await _dispatch(request, UPLOAD_METHODS)


async def _dispatch(request: web.Request, methods: dict[str, Handler]) -> web.StreamResponse:
    """Run the method's handler; its refusals say the upload is not complete (in the
    version's field), a wrong offset and a wrong digest as the draft's problems, and a 413
    the limits."""
    version = _version(request)
    handler = methods.get(request.method)
    if handler is None:
        raise MethodNotAllowed(request.method, ", ".join(methods))
    try:
        return await handler(request)
    except ChecksumMismatch as mismatch:
        field = "Content-Digest" if "Content-Digest" in request.headers else "Repr-Digest"
        refusal = DigestMismatch(field)
        refusal.headers.update(mismatch.headers)
        refusal.headers.update(draft.complete_headers(version, False))
        raise refusal from None
    except TusError as refusal:
        if isinstance(refusal, OffsetMismatch):
            refusal.problem = draft.mismatching_offset_problem(refusal.expected, refusal.got)
        for name, value in draft.complete_headers(version, False).items():
            refusal.headers.setdefault(name, value)
        if refusal.status == 413:
            refusal.headers.update(_limits(request, None))
        raise
