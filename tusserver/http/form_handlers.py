"""Form uploads: a plain `multipart/form-data` POST to the collection (a browser form,
`curl -F`), for senders without a tus client. The protocol middleware marks it (`FORM`).

Every file part becomes one new upload, streamed through the very path of a tus creation with
upload: `Uploads.create` with a `Body` whose length is unknown and whose end is the upload's
end (`Body.is_whole_upload`), so blocks, `--body-memory`, the running SHA-256, fsync, the
`completed` event, 413 past the size limit and the idle timeout are PATCH's own. The part
reaches the service as a real `StreamReader` (`aiohttp_private.FedStream`) that a small task
feeds from the part's chunks; the stream pauses that task while it holds more than
`2 * PART_BUFFER_BYTES` unread, so one part costs a bounded buffer plus the service's blocks,
whatever its size. An adapter imitating a `StreamReader` was the other way, but the service
and `aiohttp_private` use the stream's own methods and fields (errors set on it to wake the
reader, the bytes it buffered when it failed), and a real stream keeps all of that true.

A part's header block is bounded (MAX_PART_HEADER_LINES of PART_HEADER_LINE_BYTES), as is the
number of files (--max-form-files); past either the form is malformed (400).
Text fields (at most --max-form-fields of FIELD_MAX_BYTES each) become metadata of every file after
them; a field after a file part is refused (400), since the file's upload already exists. The
part's `filename` and `Content-Type` become `filename` and `filetype`. The size limit (the
smaller of --max-size and the token's maximum) bounds each part and all the parts of one
request together: a part that takes the form past it is refused (413) as it streams. The
request is all or nothing: on any refusal (413, 400 for a malformed body, a hang-up) the
uploads it created are terminated, the ones already completed too (the parent hears their
`completed`, then their `terminated` event), so nothing is half-stored. The answer is 201 with
`{"uploads": [{id, url, length, sha256, metadata}]}`, or for a browser form with a `redirect`
field (not metadata), `303 See Other` to that URL with `uploads=<id>,<id>` added to its query;
only a URL of the server's own origin or one named in --cors-origins is followed (400 before
anything is stored otherwise: no open redirect). Each file needs the `create` scope.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from tusserver import protocol
from tusserver.aiohttp_private import FedStream, send_continue
from tusserver.auth import Grant
from tusserver.errors import BadRequest
from tusserver.http import handlers
from tusserver.http.keys import PRE_CREATE, SETTINGS
from tusserver.uploads.service import Body, NewUpload, SizeLimit, Upload

FIELD_MAX_BYTES = 4 * 2**10
# A part's header block: Content-Disposition (with a file name), Content-Type, rarely more.
# The request's own limits (--max-header-size a line, 128 lines) would let one part hold
# megabytes of headers in memory.
PART_HEADER_LINE_BYTES = 8 * 2**10
MAX_PART_HEADER_LINES = 16
PART_BUFFER_BYTES = 64 * 2**10  # a part's stream pauses its feeder past twice this
PART_CHUNK_BYTES = 64 * 2**10
# What aiohttp's multipart reader raises for a body that does not parse.
MALFORMED = (ValueError, RuntimeError, HttpProcessingError)
PLAIN_TRANSFER_ENCODINGS = frozenset({"", "binary", "8bit", "7bit"})
REDIRECT_FIELD = "redirect"

log = logging.getLogger("tusserver.forms")


async def post(request: web.Request) -> web.Response:
    """Store every file part of a multipart/form-data body as a completed upload: 201 with
    their ids, URLs, lengths, SHA-256 and metadata. 403 without the `create` scope, 400 for a
    malformed form (or one without files, or a `redirect` to an origin not allowed), 413 for
    a part past the size limit; 303 to the `redirect` field's URL when there is one."""
    who = handlers.grant(request)
    who.require("create")
    url_of = handlers.location_of(request)  # 400 for a Host this server makes no URLs for
    protocol.require_identity_encoding(request.headers.get("Content-Encoding"))
    await send_continue(request)
    created: list[Upload] = []
    redirect: list[URL] = []
    try:
        await _store_parts(request, who, url_of, created, redirect)
    except BaseException:
        await asyncio.shield(_remove(request, who, created))
        raise
    if not created:
        raise BadRequest("the form has no file part")
    if redirect:
        ids = ",".join(upload.upload_id for upload in created)
        raise web.HTTPSeeOther(location=redirect[0].update_query(uploads=ids))
    return web.json_response({"uploads": [_described(upload) for upload in created]}, status=201)


async def _store_parts(
    request: web.Request, who: Grant, url_of: str, created: list[Upload], redirect: list[URL]
) -> None:
    """Read the form part by part: fields into `fields` (`redirect` apart), each file into a
    new upload."""
    fields: dict[str, bytes | None] = {}
    limit = handlers.size_limit(request)
    settings = request.app[SETTINGS]
    try:
        reader = MultipartReader(
            request.headers, request.content,
            max_field_size=PART_HEADER_LINE_BYTES, max_headers=MAX_PART_HEADER_LINES,
        )  # fmt: skip
    except MALFORMED as error:
        raise BadRequest(f"the multipart body is malformed: {error}") from None
    while True:
        try:
            part = await reader.next()
        except MALFORMED as error:
            raise BadRequest(f"the multipart body is malformed: {error}") from None
        if part is None:
            return
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart parts are not accepted")
        if part.filename is None:
            if created:
                raise BadRequest("text fields must come before the file parts")
            if len(fields) >= settings.max_form_fields:
                raise BadRequest(f"a form may have at most {settings.max_form_fields} text fields")
            name, value = _field_name(part), await _read_field(part)
            if name == REDIRECT_FIELD:
                redirect[:] = [_allowed_redirect(request, url_of, value)]
            else:
                fields[name] = value
        elif part.filename == "":  # a browser's file input with no file chosen
            await _read_to_end(part)
        else:
            if len(created) >= settings.max_form_files:
                raise BadRequest(f"a form may have at most {settings.max_form_files} files")
            stored = sum(upload.length or 0 for upload in created)
            created.append(
                await _store_file(request, who, url_of, part, fields, limit.after(stored))
            )


def _field_name(part: BodyPartReader) -> str:
    if not part.name:
        raise BadRequest("a form field has no name")
    return part.name


async def _read_field(part: BodyPartReader) -> bytes:
    """A text field's value, at most FIELD_MAX_BYTES (400 past)."""
    value = b""
    try:
        while chunk := await part.read_chunk(FIELD_MAX_BYTES + 1):
            value += chunk
            if len(value) > FIELD_MAX_BYTES:
                raise BadRequest(f"a form field is longer than {FIELD_MAX_BYTES} bytes")
    except MALFORMED as error:
        raise BadRequest(f"the multipart body is malformed: {error}") from None
    return value


def _allowed_redirect(request: web.Request, url_of: str, value: bytes) -> URL:
    """The `redirect` field's URL if its origin is this server's own or one of --cors-origins
    (named, not `*`); 400 otherwise."""
    try:
        target = URL(value.decode("utf-8"))
        origin = str(target.origin()) if target.absolute else ""
    except ValueError:
        origin = ""
    allowed = {origin.rstrip("/") for origin in request.app[SETTINGS].cors_origins}
    allowed.add(str(URL(url_of.replace("{id}", "")).origin()))
    if not origin or target.scheme not in ("http", "https") or origin not in allowed:
        raise BadRequest("the redirect field's origin is neither this server's nor allowed")
    return target


async def _read_to_end(part: BodyPartReader) -> None:
    try:
        while await part.read_chunk(PART_CHUNK_BYTES):
            pass
    except MALFORMED as error:
        raise BadRequest(f"the multipart body is malformed: {error}") from None


async def _store_file(
    request: web.Request,
    who: Grant,
    url_of: str,
    part: BodyPartReader,
    fields: dict[str, bytes | None],
    limit: SizeLimit,
) -> Upload:
    """One file part as a new, completed upload of at most `limit` (see the module's
    docstring)."""
    encoding = part.headers.get("Content-Transfer-Encoding", "").strip().lower()
    if encoding not in PLAIN_TRANSFER_ENCODINGS:
        raise BadRequest(f"Content-Transfer-Encoding {encoding!r} is not accepted")
    filetype = part.headers.get("Content-Type", "application/octet-stream")
    metadata = fields | {"filename": (part.filename or "").encode(), "filetype": filetype.encode()}
    try:
        header = protocol.format_metadata(metadata)
    except ValueError:
        raise BadRequest("form field names must be printable ASCII without spaces") from None
    protocol.parse_metadata(header)  # the same bounds as Upload-Metadata
    who.check_metadata(metadata)
    await request.app[PRE_CREATE].check(who.subject, None, metadata, None)
    new = NewUpload(
        owner=who.subject, length=None, metadata=header, concat="", url_of=url_of,
        created_by=who.created_by, quota=who.batch_quota,
    )  # fmt: skip
    fed = FedStream(PART_BUFFER_BYTES)
    body = Body(stream=fed.stream, content_length=None, checksum=None, is_whole_upload=True)
    feeding = asyncio.create_task(_feed(part, fed))
    try:
        outcome = await handlers.uploads(request).create(new, body, limit)
    finally:
        feeding.cancel()
        await asyncio.gather(feeding, return_exceptions=True)
    if outcome.refusal is None:
        return outcome.upload
    await _remove(request, who, [outcome.upload])
    if isinstance(fed.stream.exception(), MALFORMED):
        raise BadRequest(f"the multipart body is malformed: {fed.stream.exception()}")
    raise outcome.refusal


async def _feed(part: BodyPartReader, fed: FedStream) -> None:
    """Hand the part's bytes to its stream as the stream makes room; its end or its error
    (a malformed body, a hang-up) ends the stream."""
    try:
        while chunk := await part.read_chunk(PART_CHUNK_BYTES):
            await fed.feed(chunk)
    except Exception as error:  # the reader sees it as the body's own failure
        fed.end(error)
    else:
        fed.end()


async def _remove(request: web.Request, who: Grant, created: list[Upload]) -> None:
    """Terminate the uploads of a refused form: nothing of it stays half-stored."""
    for upload in created:
        try:
            await handlers.uploads(request).terminate(upload.upload_id, who.subject)
        except Exception:  # it expires by itself; the answer is already a refusal
            log.warning("could not remove upload %s of a refused form", upload.upload_id)


def _described(upload: Upload) -> dict[str, object]:
    metadata = protocol.parse_metadata(upload.metadata)
    return {
        "id": upload.upload_id,
        "url": upload.url,
        "length": upload.length,
        "sha256": upload.sha256,
        "metadata": protocol.metadata_text(metadata),
    }
