"""The endpoint's two routes, the collection and one upload: each request goes to the tus
handlers, the resumable-upload draft's or (a multipart/form-data POST) the form upload's, as
the protocol middleware classified it."""

from __future__ import annotations

from aiohttp import web

from tusserver.http import draft_handlers, form_handlers, handlers
from tusserver.http.keys import DRAFT, FORM, UPLOAD_ID


async def collection(request: web.Request) -> web.StreamResponse:
    if DRAFT in request:
        return await draft_handlers.collection(request)
    if FORM in request:
        return await form_handlers.post(request)
    return await handlers.collection(request)


async def upload(request: web.Request) -> web.StreamResponse:
    request[UPLOAD_ID] = request.match_info["upload_id"]
    if DRAFT in request:
        return await draft_handlers.upload(request)
    return await handlers.upload(request)
