"""Fixtures: a real Redis (the embedded Valkey, or TUS_TEST_REDIS_URL), real servers on
127.0.0.1 with temporary data directories, and real HTTP clients. The helpers that tests
share live in tests/support; this file holds only fixtures.

Tests that need tools pip cannot install call `tests.support.tools.require_tool`, which skips
with a reason under plain pytest and fails when TUS_TEST_REQUIRE_ALL=1 (as .ci/run sets).
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from tests.support.mobile import WORKER_COUNTS, endpoint_for
from tests.support.processes import ServerProcess, start_process
from tests.support.servers import Server, ServerFactory
from tusserver.http.access_log import AccessLogger
from tusserver.http.app import build_app, make_runner
from tusserver.settings import Settings
from tusserver.store.embedded import EmbeddedRedis

FRESH_CONNECTIONS = "fresh_connections"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{FRESH_CONNECTIONS}: the `http` fixture opens a new connection for every request",
    )


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


@pytest.fixture
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Valkey of this test alone, on a short path so a restart keeps the same URL."""
    home = Path(tmp_path_factory.mktemp("r", numbered=True))
    server = EmbeddedRedis(home)
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout_s=5)


@pytest.fixture
async def make_server(flushed_redis: str, tmp_path: Path) -> AsyncIterator[ServerFactory]:
    runners: list[web.AppRunner] = []

    async def start(**overrides: Any) -> Server:
        # Upload URLs are made for the address the tests use (a secured server needs this).
        base = Settings(data_dir=tmp_path / "data", port=0, allowed_hosts=("127.0.0.1",))
        settings = replace(base, **overrides)
        app = build_app(settings, flushed_redis)
        runner = make_runner(app, AccessLogger, shutdown_timeout_s=2)  # as the CLI serves it
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
async def http(request: pytest.FixtureRequest) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp client; under the `fresh_connections` mark it reuses no connection, so a
    server killed mid-test leaves no stale pooled connection behind."""
    fresh = request.node.get_closest_marker(FRESH_CONNECTIONS) is not None
    connector = aiohttp.TCPConnector(force_close=fresh)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


@pytest.fixture
def processes() -> Iterator[Callable[..., ServerProcess]]:
    """Start `tusserver` processes (`start_process`); each is killed, by pid, at teardown."""
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


@pytest.fixture(params=WORKER_COUNTS)
async def endpoint(
    request: pytest.FixtureRequest,
    make_server: ServerFactory,
    processes: Callable[..., ServerProcess],
    tmp_path: Path,
) -> str:
    """The tus endpoint of a server in this process and, in a second run, of `tusserver
    --workers 2` (the mobile clients' replays run against both)."""
    return await endpoint_for(request.param, make_server, processes, tmp_path / "proc")
