"""A tusserver app served in this process on a real 127.0.0.1 port (the `make_server` and
`server` fixtures of conftest.py build them)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from tests.support.files import file_of
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
