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
from tusserver.errors import BadRequest, MethodNotAllowed, UnsupportedMediaType
from tusserver.http import handlers
from tusserver.uploads.batches import Batches, BatchView

T = TypeVar("T")
MAX_BODY_BYTES = 64 * 1024  # the opening request's JSON: counts, a name and metadata


def batches(request: web.Request) -> Batches:
    return Batches(handlers.uploads(request))


async def collection(request: web.Request) -> web.StreamResponse:
    """`<endpoint>batches`: POST opens a batch."""
    if request.method == "OPTIONS":
        return web.Response(status=204, headers={"Allow": "OPTIONS, POST"})
    if request.method != "POST":
        raise MethodNotAllowed(request.method, "OPTIONS, POST")
    who = handlers.grant(request)
    who.require("create")
    opening = await _json_body(request)
    name = _optional(opening, "name", str)
    files = _optional(opening, "files", int)
    total_bytes = _optional(opening, "bytes", int)
    metadata = _metadata(opening.get("metadata"))
    view = await batches(request).open(
        who.subject, name, files=files, total_bytes=total_bytes, metadata=metadata,
        url_of=handlers.location_of(request), quota=who.batch_quota,
    )  # fmt: skip
    headers = {"Location": view.batch.url, "Cache-Control": "no-store"}
    return web.json_response(batch_json(view), status=201, headers=headers)


async def batch(request: web.Request) -> web.StreamResponse:
    """`<endpoint>batches/<name>`: GET its state and members, DELETE it with its members."""
    name = request.match_info["name"]
    if request.method == "OPTIONS":
        return web.Response(status=204, headers={"Allow": "OPTIONS, GET, DELETE"})
    who = handlers.grant(request)
    if request.method in ("GET", "HEAD"):
        who.require("read")
        who.batch_quota.check_batch(name)
        view = await batches(request).view(who.subject, name)
        return web.json_response(batch_json(view), headers={"Cache-Control": "no-store"})
    if request.method == "DELETE":
        who.require("delete")
        who.batch_quota.check_batch(name)
        await batches(request).terminate(who.subject, name)
        return web.Response(status=204)
    raise MethodNotAllowed(request.method, "OPTIONS, GET, DELETE")


async def seal(request: web.Request) -> web.StreamResponse:
    """`<endpoint>batches/<name>/seal`: POST says no more files will join."""
    if request.method == "OPTIONS":
        return web.Response(status=204, headers={"Allow": "OPTIONS, POST"})
    if request.method != "POST":
        raise MethodNotAllowed(request.method, "OPTIONS, POST")
    name = request.match_info["name"]
    who = handlers.grant(request)
    who.require("create")
    who.batch_quota.check_batch(name)
    view = await batches(request).seal(who.subject, name)
    return web.json_response(batch_json(view), headers={"Cache-Control": "no-store"})


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
