"""A tusserver app served in this process on a real 127.0.0.1 port (the `make_server` and
`server` fixtures of conftest.py build them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tests.support.files import file_of
from tests.support.raw_http import RawResponse, authority_of, exchange, request_bytes
from tests.support.tus import upload_id_of
from tusserver.http.keys import UPLOADS
from tusserver.settings import Settings
from tusserver.uploads.service import Uploads


@dataclass
class Server:
    """A tusserver app served in this process on a real 127.0.0.1 port."""

    url: str  # the endpoint, with its trailing slash
    settings: Settings
    app: web.Application
    runner: web.AppRunner

    @property
    def root(self) -> str:
        return self.url.split("/files/")[0]

    @property
    def uploads(self) -> Uploads:
        return self.app[UPLOADS]

    def file_of(self, location: str) -> Path:
        return file_of(self.settings.data_dir, location)

    async def is_locked(self, url: str) -> bool:
        """Whether a request holds the upload at `url` (taking the free lock for an instant
        to know: a HEAD or PATCH would ask a running holder to commit or stop instead)."""
        state, upload_id = self.uploads.state, upload_id_of(url)
        token = await state.try_lock(upload_id, 1000)
        if token is not None:
            await state.release(upload_id, token)
        return token is None


ServerFactory = Callable[..., Awaitable[Server]]  # the `make_server` fixture


async def send_raw(
    server: Server,
    method: str,
    target: str | bytes,
    headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    body: bytes = b"",
    *,
    host: str | bytes | None = None,
) -> RawResponse:
    """One request on a new plain connection, exactly as given, with a Host header (the
    server's own unless `host`) and, when there is a body, its Content-Length; the answer."""
    sent: list[tuple[str | bytes, str | bytes]] = [
        ("Host", authority_of(server.url) if host is None else host)
    ]
    sent += headers
    if body:
        sent.append(("Content-Length", str(len(body))))
    data = request_bytes(method, target, sent, body)
    return await exchange(server.url, data, has_body=method != "HEAD")


async def assert_no_uploads(server: Server, owner: str = "anonymous") -> None:
    """The owner has no upload record (their index is empty) and there is no upload file."""
    assert await server.uploads.list_owned(owner, None, 1000) == []
    assert list((server.settings.data_dir / "uploads").glob("*/*")) == []
