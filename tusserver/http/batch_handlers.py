"""The batch API beside the tus endpoint (docs/events.md): `POST <endpoint>batches` opens a
batch, `GET`/`DELETE <endpoint>batches/<name>` read or terminate it, and
`POST <endpoint>batches/<name>/seal` says no more files will come. JSON in and out; the
same tokens as uploads (create, read, delete), and a token's `batch` claim reaches only its
own batch.
"""

from __future__ import annotations

import json
from typing import TypeVar

from aiohttp import web

from tusserver import protocol
from tusserver.errors import BadRequest, UnsupportedMediaType
from tusserver.http import handlers
from tusserver.uploads.batches import Batches, BatchView

T = TypeVar("T")
MAX_BODY_BYTES = 64 * 1024  # the opening request's JSON: counts, a name and metadata


def batches(request: web.Request) -> Batches:
    return Batches(handlers.uploads(request))


async def open_batch(request: web.Request) -> web.Response:
    """POST `<endpoint>batches`: open a batch (201, its URL in `Location`)."""
    who = handlers.grant(request)
    who.require("create")
    opening = await _json_body(request)
    view = await batches(request).open(
        who.subject, _optional(opening, "name", str),
        files=_optional(opening, "files", int), total_bytes=_optional(opening, "bytes", int),
        metadata=_metadata(opening.get("metadata")), url_of=handlers.location_of(request),
        quota=who.batch_quota,
    )  # fmt: skip
    headers = {"Location": view.batch.url, "Cache-Control": "no-store"}
    return web.json_response(batch_json(view), status=201, headers=headers)


async def read(request: web.Request) -> web.Response:
    """GET `<endpoint>batches/<name>`: its state, members and progress."""
    subject, name = _own_batch(request, "read")
    return _answer(await batches(request).view(subject, name))


async def terminate(request: web.Request) -> web.Response:
    """DELETE `<endpoint>batches/<name>`: the batch and every member (204)."""
    subject, name = _own_batch(request, "delete")
    await batches(request).terminate(subject, name)
    return web.Response(status=204)


async def seal(request: web.Request) -> web.Response:
    """POST `<endpoint>batches/<name>/seal`: no more files will join."""
    subject, name = _own_batch(request, "create")
    return _answer(await batches(request).seal(subject, name))


def _own_batch(request: web.Request, action: str) -> tuple[str, str]:
    """The subject and the batch name of the URL, after the token's action and batch checks
    (403; 404 for a batch the token does not reach)."""
    who = handlers.grant(request)
    who.require(action)
    name = request.match_info["name"]
    who.batch_quota.check_batch(name)
    return who.subject, name


def _answer(view: BatchView) -> web.Response:
    return web.json_response(batch_json(view), headers={"Cache-Control": "no-store"})


def _routed(methods: dict[str, handlers.Handler]) -> handlers.Handler:
    """One route's handler: OPTIONS names its methods, other methods go to theirs (405 for
    any other), as the tus routes' dispatch does."""

    async def allowed(_request: web.Request) -> web.Response:
        return web.Response(status=204, headers={"Allow": ", ".join(table)})

    table: dict[str, handlers.Handler] = {"OPTIONS": allowed, **methods}

    async def route(request: web.Request) -> web.StreamResponse:
        return await handlers.dispatch(request, table)

    return route


collection = _routed({"POST": open_batch})
batch = _routed({"GET": read, "HEAD": read, "DELETE": terminate})
seal_route = _routed({"POST": seal})


def batch_json(view: BatchView) -> dict[str, object]:
    """A batch as the API and docs/events.md show it."""
    batch = view.batch
    lengths = [length for _upload_id, length in batch.paths.values()]
    known_total = None if None in lengths else sum(length or 0 for length in lengths)
    return {
        "id": batch.name,
        "url": batch.url,
        "state": batch.status,
        "expected": {"files": batch.files_expected, "bytes": batch.bytes_expected},
        "metadata": protocol.metadata_text(protocol.parse_metadata(batch.metadata)),
        "progress": {
            "files": batch.files,
            "files_completed": batch.done,
            "bytes": batch.bytes_expected if batch.bytes_expected is not None else known_total,
            "bytes_received": view.bytes_received,
            "bytes_completed": batch.done_bytes,
        },
        "created": batch.created_at,
        "completed": batch.completed_at,
        "expires": batch.expires_at,
        "members": [
            {
                "path": member.path,
                "id": member.upload_id,
                "url": None if member.upload is None else member.upload.url,
                "state": "gone" if member.upload is None else member.upload.status,
                "offset": None if member.upload is None else member.upload.offset,
                "length": None if member.upload is None else member.upload.length,
                "sha256": None if member.upload is None else member.upload.sha256 or None,
            }
            for member in view.members
        ],
    }


async def _json_body(request: web.Request) -> dict[str, object]:
    """The request's JSON object ({} for no body); 400/413/415 otherwise."""
    if not handlers.has_body(request):
        return {}
    if request.content_type != "application/json":
        raise UnsupportedMediaType("send the batch as application/json")
    protocol.require_identity_encoding(request.headers.get("Content-Encoding"))
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES or not request.content.is_eof():
        raise BadRequest(f"a batch's JSON may be at most {MAX_BODY_BYTES} bytes")
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(value) - {"name", "files", "bytes", "metadata"}
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
    return value


def _optional(opening: dict[str, object], key: str, kind: type[T]) -> T | None:
    value = opening.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"{key!r} must be {'a number' if kind is int else 'a string'}")
    if isinstance(value, int) and not 0 <= value <= protocol.MAX_INTEGER:
        raise BadRequest(f"{key!r} is out of range")
    return value


def _metadata(value: object) -> str:
    """The batch's metadata, an object of strings, in Upload-Metadata form (its bounds too)."""
    if value is None:
        return ""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise BadRequest("'metadata' must be an object of strings")
    try:
        header = protocol.format_metadata({str(k): v.encode() for k, v in value.items()})
    except ValueError:
        raise BadRequest("metadata keys must be printable ASCII without spaces") from None
    protocol.parse_metadata(header)
    return header
