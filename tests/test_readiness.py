"""GET /ready: what a load balancer asks before sending uploads to a process. Real servers,
real Redis (one of the test's own, stopped and started again), a real data directory, and
real processes sent SIGTERM (not ready at once, still serving until --drain-delay ends)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.processes import StartProcess, pid_is_gone, start_server
from tests.support.servers import Server, ServerFactory
from tests.support.tus import create_upload, patch
from tests.support.waiting import wait_until, wait_until_sync
from tests.support.workers import children_of, tcp_socket_inodes
from tusserver.http.access_log import AccessLogger
from tusserver.http.app import build_app, make_runner
from tusserver.settings import Settings
from tusserver.store.embedded import EmbeddedRedis


async def readiness(http: aiohttp.ClientSession, server: Server) -> tuple[int, dict[str, Any]]:
    async with http.get(server.root + "/ready") as response:
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def test_a_healthy_server_is_ready_without_a_token(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("s3cret",))
    status, body = await readiness(http, server)
    assert status == 200
    assert body["status"] == "ready"
    assert body["checks"] == {"stopping": "ok", "redis": "ok", "data_dir": "ok", "free_disk": "ok"}
    assert body["failed"] == []


async def test_a_draining_server_is_not_ready_at_once(
    server: Server, http: aiohttp.ClientSession
) -> None:
    server.uploads.stop_writers()  # what the graceful stop calls first
    status, body = await readiness(http, server)
    assert status == 503
    assert body["failed"] == ["stopping"]
    async with http.get(server.root + "/health") as health:
        assert health.status == 200  # alive, only not taking new work


async def test_too_little_free_disk_is_not_ready(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(min_free_disk_bytes=2**62)
    status, body = await readiness(http, server)
    assert status == 503
    assert body["failed"] == ["free_disk"]
    assert "--min-free-disk" in body["checks"]["free_disk"]


async def test_a_data_dir_that_cannot_be_written_is_not_ready(
    server: Server, http: aiohttp.ClientSession
) -> None:
    # (the tests may run as root, whom permissions do not stop: a file takes the folder's place)
    shutil.rmtree(server.settings.data_dir)
    server.settings.data_dir.write_bytes(b"not a folder")
    status, body = await readiness(http, server)
    assert status == 503
    assert "data_dir" in body["failed"]


@contextlib.asynccontextmanager
async def serve_on(redis_url: str, data_dir: Path) -> AsyncIterator[Server]:
    settings = Settings(data_dir=data_dir, port=0, allowed_hosts=("127.0.0.1",))
    runner = make_runner(build_app(settings, redis_url), AccessLogger, shutdown_timeout_s=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        yield Server(f"http://127.0.0.1:{port}/files/", settings, runner.app, runner)
    finally:
        await runner.cleanup()


async def test_readiness_follows_redis_down_and_back(
    own_redis: EmbeddedRedis, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with serve_on(own_redis.url, tmp_path / "data") as server:
        assert (await readiness(http, server))[0] == 200
        own_redis.stop()
        status, body = await readiness(http, server)
        assert status == 503
        assert body["failed"] == ["redis"]
        own_redis.start()

        async def is_ready() -> bool:
            return (await readiness(http, server))[0] == 200

        await wait_until(is_ready, what="/ready to answer 200 once Redis is back")


async def test_ready_answers_cors_like_health(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(cors_origins=("https://app.example",))
    headers = {"Origin": "https://app.example"}
    async with http.get(server.root + "/ready", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.fresh_connections  # with two workers, each request may land on either
async def test_sigterm_makes_ready_503_while_the_listener_still_serves(
    workers: str, tmp_path: Path, processes: StartProcess, http: aiohttp.ClientSession
) -> None:
    process = await start_server(
        processes, tmp_path / "data", "--workers", workers, "--drain-delay", "1h"
    )
    root = process.url.split("/files/")[0]
    # at once: workers may still be starting (a SIGTERM must wait for their handlers, not
    # kill them and leave their sockets taking connections that nobody accepts)
    process.process.send_signal(signal.SIGTERM)

    async def not_ready() -> bool:
        async with http.get(root + "/ready", timeout=aiohttp.ClientTimeout(total=10)) as answer:
            return answer.status == 503 and (await answer.json())["failed"] == ["stopping"]

    await wait_until(not_ready, what="/ready answering 503 after SIGTERM")
    for _ in range(8):  # every worker is draining, and each still serves uploads
        assert await not_ready()
        url = await create_upload(http, process.url, 5)
        assert (await patch(http, url, 0, b"hello")).status == 204
    async with http.get(root + "/health") as health:
        assert health.status == 200
    assert "draining: /ready answers 503" in process.log()
    process.process.send_signal(signal.SIGTERM)  # the second one ends the delay
    assert await asyncio.to_thread(process.process.wait, 30) == 0


@pytest.mark.skipif(sys.platform != "linux", reason="one socket per worker (SO_REUSEPORT)")
@pytest.mark.fresh_connections
async def test_a_worker_that_dies_while_draining_takes_its_socket_with_it(
    tmp_path: Path, processes: StartProcess, http: aiohttp.ClientSession
) -> None:
    process = await start_server(
        processes, tmp_path / "data", "--workers", "2", "--drain-delay", "1h"
    )
    root = process.url.split("/files/")[0]
    valkey = int((process.data_dir / "redis" / "valkey.pid").read_text())
    wait_until_sync(lambda: len(children_of(process.process.pid) - {valkey}) == 2)
    process.process.send_signal(signal.SIGTERM)
    os.kill(min(children_of(process.process.pid) - {valkey}), signal.SIGKILL)

    def listening_sockets() -> int:
        return len(tcp_socket_inodes(process.port, None))

    # the supervisor closes the dead worker's socket (it holds every worker's): the kernel
    # must not queue connections where nobody will accept them
    await wait_until(lambda: listening_sockets() == 1, what="one listening socket left")
    for _ in range(8):
        async with http.get(root + "/ready", timeout=aiohttp.ClientTimeout(total=10)) as answer:
            assert answer.status == 503
    # a draining worker whose supervisor is killed stops too, without waiting out the delay
    [survivor] = children_of(process.process.pid) - {valkey}
    process.process.kill()
    await wait_until(lambda: pid_is_gone(survivor), what="the orphaned worker stopping")


async def test_an_aof_that_could_not_be_synced_fails_creations_and_readiness(
    make_server: ServerFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The AOF a process syncs itself (store/aof.py) could not be fdatasynced (here a file
    that fdatasync refuses: /dev/null): a creation gets 503, not a 201 that a crash could
    take back, and /ready says why, so a load balancer sends uploads elsewhere."""
    aof_dir = tmp_path / "appendonlydir"
    aof_dir.mkdir()
    (aof_dir / "appendonly.aof.1.incr.aof").symlink_to("/dev/null")
    server = await make_server(own_aof_dir=aof_dir)
    headers = {"Tus-Resumable": "1.0.0", "Upload-Length": "10"}
    async with http.post(server.url, headers=headers) as response:
        assert response.status == 503
        assert "could not be synced" in await response.text()
    status, body = await readiness(http, server)
    assert status == 503
    assert "could not be synced" in body["checks"]["redis"]
