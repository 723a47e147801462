"""A parent's webhook for tests: an aiohttp server on loopback that records every event
request and answers as the test says."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        parsed: dict[str, Any] = json.loads(self.body)
        return parsed

    @property
    def attempt(self) -> int:
        return int(self.headers.get("Tus-Event-Attempt", "0"))


Answer = Callable[[Received], "web.Response | None"]  # None: never answer (until teardown)


@dataclass
class Receiver:
    """Records every request; answers with `answer` (204 by default)."""

    requests: list[Received] = field(default_factory=list)
    accepted: list[Received] = field(default_factory=list)
    answer: Answer = lambda _received: web.Response(status=204)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        received = Received(request.path, dict(request.headers), await request.read())
        self.requests.append(received)
        response = self.answer(received)
        if response is None:
            await self.release.wait()
            return web.Response(status=504)
        if 200 <= response.status < 300:
            self.accepted.append(received)
        return response

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/hooks"
        return self.url

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    def accepted_events(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [r.json for r in self.accepted if kind is None or r.json["type"] == kind]
