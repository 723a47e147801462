"""What must reach the disk before the client is answered (docs/architecture.md): with the
default `--fsync always`, a creation answered 201, a completion answered 204 (its digest and
its `completed` event) survive a SIGKILL of Valkey at once, both an external one with
`appendfsync always` and the embedded one the defaults run (`appendfsync no`, its AOF
fdatasynced by tusserver); an offset between checkpoints may lag behind the bytes on disk
after one (the client sends those again, nothing is lost), never ahead of them; and a
planned stop of the embedded Valkey keeps the newest offsets.

Real tusserver processes and real Valkeys killed with SIGKILL. A SIGKILL leaves the page
cache to the next process, so these show that the records are in the AOF when the client is
answered; that they are also on the disk is shown by the order of the system calls
(test_durability.py) and by a full disk under the AOF (test_aof_sync.py)."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.support.events import event_types
from tests.support.faults import MiB, finish_upload
from tests.support.files import file_of
from tests.support.processes import ServerProcess, StartProcess, on, start_server
from tests.support.tus import (
    completed_digest,
    create_upload,
    head,
    head_offset,
    patch_headers,
    repr_digest_of,
    upload_id_of,
)
from tests.support.waiting import wait_until
from tusserver.store.embedded import EmbeddedRedis

pytestmark = pytest.mark.fresh_connections  # a Valkey killed mid-test: no stale connection


@pytest.fixture
def always_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Valkey of this test with `appendfsync always`, as the default settings run it."""
    server = EmbeddedRedis(Path(tmp_path_factory.mktemp("r", numbered=True)), appendfsync="always")
    server.start()
    try:
        yield server
    finally:
        server.stop(timeout_s=5)


@pytest.fixture
def short_data_dir() -> Iterator[Path]:
    """A data directory whose embedded Valkey's socket path is short enough to dial as is."""
    folder = Path(tempfile.mkdtemp(prefix="tus-"))
    try:
        yield folder / "data"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def crash_embedded_and_restart(
    processes: StartProcess, server: ServerProcess
) -> ServerProcess:
    """SIGKILL the embedded Valkey of `server` at once (its tusserver then exits non-zero),
    and start tusserver again on the same data directory, which starts Valkey from its AOF."""
    pidfile = server.data_dir / "redis" / "valkey.pid"
    os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
    assert await asyncio.to_thread(server.process.wait, 30) != 0
    return await start_server(processes, server.data_dir)


async def crash_and_restart(redis: EmbeddedRedis, http: aiohttp.ClientSession, url: str) -> None:
    """SIGKILL Valkey (nothing but its AOF survives) and start it again on the same files."""
    assert redis.pid is not None
    os.kill(redis.pid, signal.SIGKILL)
    await asyncio.to_thread(redis.stop)  # reaps it, lets go of the folder
    await asyncio.to_thread(redis.start)

    async def answers() -> bool:
        return (await head(http, url)).status == 200

    await wait_until(answers, 20, what="tusserver answers again after Valkey restarted")


async def serve(
    processes: StartProcess, tmp_path: Path, redis: EmbeddedRedis, *args: str
) -> ServerProcess:
    return await start_server(processes, tmp_path / "data", "--redis-url", redis.url, *args)


async def test_a_creation_and_a_completion_survive_a_valkey_crash_right_after_the_answer(
    tmp_path: Path,
    processes: StartProcess,
    always_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    server = await serve(processes, tmp_path, always_redis)
    created = await create_upload(http, server.url, 10)
    await crash_and_restart(always_redis, http, created)
    assert await head_offset(http, created) == 0  # the 201 named a durable upload

    source = os.urandom(3 * MiB)
    url = await create_upload(http, server.url, len(source))
    async with http.patch(url, data=io.BytesIO(source), headers=patch_headers(0)) as response:
        assert response.status == 204
    await crash_and_restart(always_redis, http, url)
    answer = await head(http, url)
    assert answer.headers["Upload-Offset"] == str(len(source))
    assert answer.headers["Repr-Digest"] == repr_digest_of(source)
    assert await event_types(always_redis.url, upload_id_of(url)) == ["created", "completed"]


async def test_with_the_defaults_a_creation_and_a_completion_survive_an_embedded_valkey_crash(
    short_data_dir: Path, processes: StartProcess, http: aiohttp.ClientSession
) -> None:
    server = await start_server(processes, short_data_dir)
    created = await create_upload(http, server.url, 10)
    server = await crash_embedded_and_restart(processes, server)
    assert await head_offset(http, on(server, created)) == 0

    source = os.urandom(3 * MiB)
    url = await create_upload(http, server.url, len(source))
    async with http.patch(url, data=io.BytesIO(source), headers=patch_headers(0)) as response:
        assert response.status == 204
    server = await crash_embedded_and_restart(processes, server)
    answer = await head(http, on(server, url))
    assert answer.status == 200, answer.status
    assert answer.headers["Upload-Offset"] == str(len(source))
    assert answer.headers["Repr-Digest"] == repr_digest_of(source)
    valkey = f"unix://{short_data_dir / 'redis' / 'valkey.sock'}"  # mkdtemp's path is absolute
    assert await event_types(valkey, upload_id_of(url)) == ["created", "completed"]


async def test_an_offset_between_checkpoints_lags_after_a_crash_and_the_upload_completes(
    tmp_path: Path,
    processes: StartProcess,
    always_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    """With a checkpoint far away, a 204's offset lives in Valkey's memory only: after a
    crash the upload is back at its last durable offset (its creation's), while its bytes are
    on disk; the client sends from there, and the file ends exact."""
    server = await serve(processes, tmp_path, always_redis, "--offset-checkpoint", "1h")
    source = os.urandom(4 * MiB)
    url = await create_upload(http, server.url, len(source))
    async with http.patch(url, data=io.BytesIO(source[:MiB]), headers=patch_headers(0)) as r:
        assert r.status == 204 and r.headers["Upload-Offset"] == str(MiB)
    path = file_of(server.data_dir, url)
    assert path.stat().st_size == MiB  # fsynced before the 204 (test_durability.py)
    await crash_and_restart(always_redis, http, url)
    assert await head_offset(http, url) == 0  # lagging, never ahead of the bytes on disk
    assert await finish_upload(http, url, source) == [204]
    assert await completed_digest(http, url) == repr_digest_of(source)
    assert path.read_bytes() == source


async def test_with_checkpoints_at_every_commit_no_offset_lags(
    tmp_path: Path,
    processes: StartProcess,
    always_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    server = await serve(processes, tmp_path, always_redis, "--offset-checkpoint", "0")
    source = os.urandom(2 * MiB)
    url = await create_upload(http, server.url, len(source))
    async with http.patch(url, data=io.BytesIO(source[:MiB]), headers=patch_headers(0)) as r:
        assert r.status == 204
    await crash_and_restart(always_redis, http, url)
    assert await head_offset(http, url) == MiB


async def test_a_planned_stop_of_the_embedded_valkey_keeps_the_newest_offsets(
    tmp_path: Path, processes: StartProcess, http: aiohttp.ClientSession
) -> None:
    """tusserver stopping (SIGTERM) stops its Valkey after writing the whole dataset into the
    AOF, offsets between checkpoints included: a restart resumes where the client was."""
    data_dir = tmp_path / "data"
    server = await start_server(processes, data_dir, "--offset-checkpoint", "1h")
    source = os.urandom(2 * MiB)
    url = await create_upload(http, server.url, len(source))
    async with http.patch(url, data=io.BytesIO(source[:MiB]), headers=patch_headers(0)) as r:
        assert r.status == 204
    assert server.stop(signal.SIGTERM) == 0
    server = await start_server(processes, data_dir, "--offset-checkpoint", "1h")
    url = on(server, url)
    assert await head_offset(http, url) == MiB
    assert await finish_upload(http, url, source) == [204]
    assert file_of(data_dir, url).read_bytes() == source
