"""Fixtures: a real Redis (the embedded Valkey, or TUS_TEST_REDIS_URL), real servers on
127.0.0.1 with temporary data directories, and real HTTP clients.

Tests that need tools pip cannot install call `require_tool`, which skips with a reason under
plain pytest and fails when TUS_TEST_REQUIRE_ALL=1 (as .ci/run sets).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from tusserver.http.access_log import AccessLogger
from tusserver.http.app import build_app
from tusserver.http.keys import UPLOADS
from tusserver.settings import Settings
from tusserver.store.embedded import EmbeddedRedis
from tusserver.uploads.service import Uploads

TUS = {"Tus-Resumable": "1.0.0"}
OFFSET_STREAM = "application/offset+octet-stream"


def require_tool(available: bool, reason: str) -> None:
    """Skip (plain pytest) or fail (TUS_TEST_REQUIRE_ALL=1) when a tool is missing."""
    if available:
        return
    if os.environ.get("TUS_TEST_REQUIRE_ALL") == "1":
        pytest.fail(f"required under TUS_TEST_REQUIRE_ALL=1: {reason}")
    pytest.skip(reason)


def patch_headers(offset: int, **extra: str) -> dict[str, str]:
    return {**TUS, "Upload-Offset": str(offset), "Content-Type": OFFSET_STREAM, **extra}


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """TUS_TEST_REDIS_URL (CI points it at a stock Redis for the state tests), else one
    embedded Valkey for the whole session."""
    external = os.environ.get("TUS_TEST_REDIS_URL")
    if external:
        yield external
        return
    embedded = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    try:
        yield embedded.start()
    finally:
        embedded.stop()


@pytest.fixture
def flushed_redis(redis_url: str) -> str:
    """The session's Redis, emptied: every test starts from no uploads."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
    return redis_url


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
        upload_id = location.rstrip("/").rsplit("/", 1)[1]
        return self.settings.data_dir / "uploads" / upload_id[:2] / upload_id


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def make_server(flushed_redis: str, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> Server:
        settings = replace(Settings(data_dir=tmp_path / "data", port=0), **overrides)
        app = build_app(settings, flushed_redis)
        runner = web.AppRunner(
            app, handle_signals=False, shutdown_timeout=2, access_log_class=AccessLogger
        )
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        return Server(f"http://127.0.0.1:{port}{settings.base_path}", settings, app, runner)

    yield start
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def server(make_server: ServerFactory) -> Server:
    return await make_server()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def create_upload(
    http: aiohttp.ClientSession, server: Server, length: int | None = None, **headers: str
) -> str:
    """POST a new upload; its absolute URL."""
    sent = {**TUS, **headers}
    if length is not None:
        sent["Upload-Length"] = str(length)
    async with http.post(server.url, headers=sent) as response:
        assert response.status == 201, await response.text()
        return response.headers["Location"]


async def head_offset(http: aiohttp.ClientSession, url: str, **headers: str) -> int:
    async with http.head(url, headers={**TUS, **headers}) as response:
        assert response.status == 200
        return int(response.headers["Upload-Offset"])


# -- a tusserver process, for restarts, kills and several processes -----------------------


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    data_dir: Path
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_process(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Start `tusserver` in a subprocess on a free port; wait until it listens."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir.parent / f"tusserver-{time.monotonic_ns()}.log"
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "tusserver", "--host", "127.0.0.1", "--port", "0",
         "--data-dir", str(data_dir), *args],
        stdout=log_file, stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    log_file.close()
    try:
        return ServerProcess(process, listening_url(process, log_path), data_dir, log_path)
    except AssertionError:
        process.kill()
        process.wait()
        raise


def listening_url(process: subprocess.Popen[bytes], log_path: Path, timeout_s: float = 30) -> str:
    """The URL a starting tusserver announces in its log; AssertionError (with the log) if
    the process exits or the deadline passes first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        match = re.search(r"listening on (http://\S+)", log_path.read_text(errors="replace"))
        if match:
            return match.group(1)
        time.sleep(0.05)
    raise AssertionError(f"tusserver did not start:\n{log_path.read_text(errors='replace')}")


@pytest.fixture
def processes() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
        started.append(start_process(data_dir, *args, env=env))
        return started[-1]

    yield start
    for proc in started:
        if proc.process.poll() is None:
            proc.process.kill()
            proc.process.wait()
    # a killed supervisor leaves its embedded Valkey behind: stop it by its pidfile
    for proc in started:
        pidfile = proc.data_dir / "redis" / "valkey.pid"
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


def has_tool(name: str) -> bool:
    return shutil.which(name) is not None


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0, every_s: float = 0.02
) -> None:
    """Poll `check` until it holds (a deadline, not a sleep that makes a race pass)."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(every_s)
