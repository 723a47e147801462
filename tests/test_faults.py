"""Faults: resumes survive SIGKILL, SIGTERM, dropped connections, a Redis restart and a full
disk, with the exact bytes at the end.

Real `tusserver` processes on real sockets, real Redis, real files. Random points come from one
seed per test, printed on failure (set TUS_FAULT_SEED to replay one). Other files of this
suite: test_takeover.py (two processes on one upload), test_workers.py (--workers).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests import faultfs
from tests.conftest import TUS, ServerFactory, ServerProcess, patch_headers, require_tool
from tusserver.store.embedded import EmbeddedRedis
from tusserver.store.records import redis_key, shard_of

MiB = 2**20
BLOCK_BYTES = 4 * MiB  # the server writes a body in blocks of this size
DEADLINE_S = 20.0  # for one upload to get through after a fault (stale locks last ~3 s)
StartProcess = Callable[..., ServerProcess]


# -- helpers: randomness, HTTP over aiohttp, HTTP over a raw socket ----------------------


def seeded_random() -> tuple[random.Random, str]:
    """A Random and a note naming its seed (TUS_FAULT_SEED replays a failing run)."""
    seed = int(os.environ.get("TUS_FAULT_SEED") or random.SystemRandom().randrange(2**32))
    return random.Random(seed), f"TUS_FAULT_SEED={seed}"


def repr_digest_of(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def file_of(data_dir: Path, url: str) -> Path:
    upload_id = url.rstrip("/").rsplit("/", 1)[1]
    return data_dir / "uploads" / upload_id[:2] / upload_id


async def start_server(processes: StartProcess, data_dir: Path, *args: str) -> ServerProcess:
    """Start a tusserver process off the event loop (starting waits for it to listen)."""
    return await asyncio.to_thread(processes, data_dir, *args)


async def create(http: aiohttp.ClientSession, endpoint: str, length: int) -> str:
    async with http.post(endpoint, headers={**TUS, "Upload-Length": str(length)}) as response:
        assert response.status == 201, await response.text()
        return response.headers["Location"]


async def head(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    async with http.head(url, headers=TUS) as response:
        return response


async def offset_of(http: aiohttp.ClientSession, url: str) -> int:
    response = await head(http, url)
    assert response.status == 200, response.status
    return int(response.headers["Upload-Offset"])


async def finish_upload(http: aiohttp.ClientSession, url: str, source: bytes) -> list[int]:
    """HEAD, then PATCH the rest from the HEAD offset, until the upload has every byte.
    Retries what a fault leaves behind for a while (423 while a killed holder's lock lasts,
    409 when a HEAD raced a commit, 503); the statuses seen, the last one 204."""
    seen: list[int] = []
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        offset = await offset_of(http, url)
        if offset == len(source) and seen:
            return seen
        async with raw_patch(url, offset, len(source) - offset) as request:
            answer = await send_until_answered(request, source[offset:], chunk=MiB)
        assert answer is not None, f"no answer; statuses before: {seen}"
        seen.append(answer.status)
        if answer.status == 204:
            assert int(answer.headers["upload-offset"]) == len(source)
            return seen
        assert answer.status in (409, 423, 503), (answer.status, answer.body)
        await asyncio.sleep(0.1)
    raise AssertionError(f"the upload did not finish in {DEADLINE_S} s; statuses {seen}")


async def offset_when(
    http: aiohttp.ClientSession, url: str, expected: int, timeout_s: float = 5
) -> int:
    """The committed offset once it is `expected` (a request whose client hung up ends on its
    own time), or the last one seen when the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        offset = await offset_of(http, url)
        if offset == expected or time.monotonic() > deadline:
            return offset
        await asyncio.sleep(0.02)


async def completed_digest(http: aiohttp.ClientSession, url: str, timeout_s: float = 20) -> str:
    """The Repr-Digest of a complete upload, once the server has hashed it (an upload resumed
    on another process than the one that received its first bytes is hashed in the
    background)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = await head(http, url)
        assert response.status == 200
        if "Repr-Digest" in response.headers:
            return response.headers["Repr-Digest"]
        assert time.monotonic() < deadline, "no Repr-Digest in time"
        await asyncio.sleep(0.05)


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class RawRequest:
    """One HTTP/1.1 request on a plain socket: the test decides every byte of the body and
    when (or whether) the connection closes."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: int = 0  # body bytes handed to the kernel
    answered: bool = False
    _response: RawResponse | None = field(default=None, repr=False)

    @classmethod
    async def start(cls, url: str, method: str, headers: Mapping[str, str]) -> RawRequest:
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        lines = [f"{method} {parts.path} HTTP/1.1", f"Host: {parts.netloc}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        return cls(reader, writer)

    @classmethod
    async def patch(cls, url: str, offset: int, content_length: int) -> RawRequest:
        headers = {**patch_headers(offset), "Content-Length": str(content_length)}
        return await cls.start(url, "PATCH", headers)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()
        self.sent += len(data)

    async def response(self, timeout_s: float = 10.0) -> RawResponse:
        """Read the answer (status line, headers, Content-Length body)."""
        async with asyncio.timeout(timeout_s):
            status_line = await self.reader.readline()
            if not status_line:
                raise ConnectionResetError("the server closed the connection without answering")
            status = int(status_line.split()[1])
            headers: dict[str, str] = {}
            while line := (await self.reader.readline()).rstrip(b"\r\n"):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        self.answered = True
        return RawResponse(status, headers, body)

    async def close(self) -> None:
        """Close after every byte sent (FIN); at once (RST) if the server answered without
        reading all of them, or does not take them within seconds."""
        transport = self.writer.transport
        if self.answered and transport.get_write_buffer_size():
            transport.abort()
        else:
            self.writer.close()
        try:
            async with asyncio.timeout(5):
                await self.writer.wait_closed()
        except TimeoutError:
            transport.abort()
        except (OSError, asyncio.CancelledError):
            pass


@contextlib.asynccontextmanager
async def raw_patch(url: str, offset: int, content_length: int) -> AsyncIterator[RawRequest]:
    request = await RawRequest.patch(url, offset, content_length)
    try:
        yield request
    finally:
        await request.close()


async def stream_paced(
    request: RawRequest, data: bytes, *, chunk: int = 64 * 1024, pause_s: float = 0.0
) -> None:
    """Send `data` in chunks with a pause between them (a slow client)."""
    for start in range(0, len(data), chunk):
        await request.send(data[start : start + chunk])
        if pause_s:
            await asyncio.sleep(pause_s)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # no connection reuse: a server killed mid-test leaves no stale pooled connection behind
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        yield session


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


def kill_quietly(pid: int | None) -> None:
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def upload_id_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


async def wait_lock_free(redis_url: str, url: str, timeout_s: float = 10) -> None:
    """Wait until no request holds the upload's lock (a killed holder's lock expires)."""
    upload_id = upload_id_of(url)
    key = redis_key(shard_of(upload_id), "lock", upload_id)
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while await client.exists(key):
            assert time.monotonic() < deadline, "the upload's lock was not released in time"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def send_until_answered(
    request: RawRequest, data: bytes, *, chunk: int = 256 * 1024, pause_s: float = 0.0
) -> RawResponse | None:
    """Send `data` until the server answers or closes; its answer (None if it closed the
    connection without one)."""

    async def send_all() -> None:
        for start in range(0, len(data), chunk):
            await request.send(data[start : start + chunk])
            if pause_s:
                await asyncio.sleep(pause_s)

    answer = asyncio.create_task(request.response(timeout_s=30))
    sender = asyncio.create_task(send_all())
    await asyncio.wait({answer, sender}, return_when=asyncio.FIRST_COMPLETED)
    sender.cancel()  # the server answered: it reads no more
    # OSError: the server answered and closed while we were still sending
    await asyncio.gather(sender, return_exceptions=True)
    try:
        return await answer
    except (OSError, asyncio.IncompleteReadError):
        return None


def on(server: ServerProcess, url: str) -> str:
    """The upload's URL on `server` (a restarted process listens on another port)."""
    return server.url + upload_id_of(url)


def embedded_redis_url(data_dir: Path) -> str:
    return f"unix://{data_dir / 'redis' / 'valkey.sock'}"


def pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    return state == "Z"


# -- 1: SIGKILL at random points of many uploads ------------------------------------------

KILL_ROUNDS = 3
SLOW_CHUNK = 64 * 1024
SLOW_PAUSE_S = 0.02  # about 3 MiB/s per upload: a 4 MiB block takes longer than a commit interval


async def stream_until(url: str, source: bytes, offset: int, stop_at: int) -> RawRequest:
    """Open a PATCH for the rest of the upload and send, slowly, up to `stop_at`; the open
    request (the caller closes it)."""
    request = await RawRequest.patch(url, offset, len(source) - offset)
    try:
        await stream_paced(request, source[offset:stop_at], chunk=SLOW_CHUNK, pause_s=SLOW_PAUSE_S)
    except BaseException:
        await request.close()
        raise
    return request


async def test_sigkill_at_random_points_then_resume_gives_the_exact_bytes(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
) -> None:
    rng, seed = seeded_random()
    data_dir = tmp_path_factory.mktemp("kill") / "data"  # short: the Valkey socket lives here
    server = await start_server(processes, data_dir)
    sources = [rng.randbytes(rng.randrange(3 * MiB, 7 * MiB)) for _ in range(8)]
    urls = [await create(http, server.url, len(source)) for source in sources]
    offsets = [0] * len(sources)
    resumed_mid_upload = 0
    for _ in range(KILL_ROUNDS):
        # every upload sends up to its own random byte, then the server dies
        stops = [
            rng.randrange(offset + 1, len(source))
            for offset, source in zip(offsets, sources, strict=True)
        ]
        await asyncio.gather(*(wait_lock_free(embedded_redis_url(data_dir), url) for url in urls))
        streams = await asyncio.gather(
            *(
                stream_until(on(server, url), source, offset, stop)
                for url, source, offset, stop in zip(urls, sources, offsets, stops, strict=True)
            )
        )
        server.stop(signal.SIGKILL)
        for stream in streams:
            await stream.close()
        server = await start_server(processes, data_dir)  # adopts the orphaned Valkey
        after = await asyncio.gather(*(offset_of(http, on(server, url)) for url in urls))
        for index, (url, source) in enumerate(zip(urls, sources, strict=True)):
            committed = after[index]
            on_disk = file_of(data_dir, url).read_bytes()
            where = f"upload {index}, {seed}"
            assert offsets[index] <= committed <= stops[index], where
            assert len(on_disk) >= committed, where
            assert on_disk[:committed] == source[:committed], where
            resumed_mid_upload += committed > offsets[index]
        offsets = after
    for url, source in zip(urls, sources, strict=True):
        await finish_upload(http, on(server, url), source)
    for index, (url, source) in enumerate(zip(urls, sources, strict=True)):
        # hashed in the background: no process saw every byte of these uploads
        assert await completed_digest(http, on(server, url)) == repr_digest_of(source), seed
        assert file_of(data_dir, url).read_bytes() == source, f"upload {index}, {seed}"
    print(f"{seed}: {resumed_mid_upload} resumes started past the previous offset")


# -- 2: connections dropped at random byte positions --------------------------------------


async def test_dropped_connections_at_random_points_resume_to_the_exact_bytes(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    rng, seed = seeded_random()
    server = await start_server(processes, tmp_path / "data", "--redis-url", own_redis.url)
    source = rng.randbytes(10 * MiB + rng.randrange(MiB))
    url = await create(http, server.url, len(source))
    offset = 0
    for _ in range(6):
        remaining = len(source) - offset
        cut = rng.randrange(1, min(remaining, 6 * MiB))
        async with raw_patch(url, offset, remaining) as request:  # full Content-Length ...
            await stream_paced(request, source[offset : offset + cut], chunk=256 * 1024)
        # ... then the client hangs up: the server keeps every byte that reached it
        committed = await offset_when(http, url, offset + cut)
        assert committed == offset + cut, f"{committed - offset} of {cut} bytes kept; {seed}"
        on_disk = file_of(server.data_dir, url).read_bytes()
        assert on_disk[:committed] == source[:committed], seed
        offset = committed
    await finish_upload(http, url, source)
    assert await completed_digest(http, url) == repr_digest_of(source), seed
    assert file_of(server.data_dir, url).read_bytes() == source, seed


async def test_a_hang_up_keeps_the_bytes_that_reached_the_server(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    server = await start_server(processes, tmp_path / "data", "--redis-url", own_redis.url)
    source = os.urandom(2 * MiB)
    url = await create(http, server.url, len(source))
    body = source[: 200 * 1024]
    # A half-open PATCH holds the lock, so the next PATCH waits (>= one 20 ms poll) before
    # it reads its body: by then its whole body, and the hang-up, have reached the server.
    async with raw_patch(url, 0, len(source)) as holder:
        await wait_lock_held(own_redis.url, url)
        hang_up = await RawRequest.start(
            url, "PATCH", {**patch_headers(0), "Content-Length": str(len(source))}
        )
        await hang_up.send(body)
        await hang_up.close()
        answer = await holder.response()
        assert answer.status == 400  # interrupted by the newer request, nothing committed
        assert answer.headers["upload-offset"] == "0"
    # (the hung-up PATCH ends on its own time: nobody is left to hear its answer)
    kept = await offset_when(http, url, len(body))
    assert kept == len(body), f"{kept} of the {len(body)} bytes that reached the server kept"


async def wait_lock_held(redis_url: str, url: str, timeout_s: float = 10) -> None:
    upload_id = upload_id_of(url)
    key = redis_key(shard_of(upload_id), "lock", upload_id)
    client = aioredis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout_s
        while not await client.exists(key):
            assert time.monotonic() < deadline, "nobody took the upload's lock in time"
            await asyncio.sleep(0.01)
    finally:
        await client.aclose()


# -- 5: Redis restarts in the middle of an upload -----------------------------------------


async def test_redis_restart_mid_upload_answers_503_then_resumes_from_the_last_commit(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    redis_url = own_redis.url
    server = await start_server(processes, tmp_path / "data", "--redis-url", redis_url)
    source = os.urandom(6 * MiB)
    url = await create(http, server.url, len(source))
    async with http.patch(url, data=io.BytesIO(source[:MiB]), headers=patch_headers(0)) as first:
        assert first.status == 204
    async with raw_patch(url, MiB, len(source) - MiB) as running:
        await running.send(source[MiB : 3 * MiB])
        await asyncio.to_thread(own_redis.stop)  # SIGTERM: the AOF is flushed
        # the running PATCH cannot renew its lock: it stops, commits nothing, says retry
        answer = await running.response(timeout_s=15)
        assert answer.status == 503, answer
        assert int(answer.headers["retry-after"]) > 0
    response = await head(http, url)
    assert response.status == 503
    assert int(response.headers["Retry-After"]) > 0
    async with http.patch(url, data=b"x" * 1024, headers=patch_headers(MiB)) as refused:
        assert refused.status == 503
        assert int(refused.headers["Retry-After"]) > 0
    await asyncio.to_thread(own_redis.start)  # same files, same socket path
    assert own_redis.url == redis_url

    deadline = time.monotonic() + 10
    while (response := await head(http, url)).status != 200:
        assert response.status == 503 and time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert int(response.headers["Upload-Offset"]) == MiB  # the last commit before the outage
    assert await finish_upload(http, url, source) == [204]
    assert await completed_digest(http, url) == repr_digest_of(source)
    assert file_of(server.data_dir, url).read_bytes() == source
    assert server.process.poll() is None  # it rode out the outage


# -- 6: a full disk, and --min-free-disk -------------------------------------------------


@pytest.fixture
def small_disk_ok() -> None:
    reason = faultfs.small_tmpfs_unavailable()
    require_tool(reason is None, reason or "")


@pytest.mark.usefixtures("small_disk_ok")
async def test_a_full_disk_answers_507_and_keeps_the_last_commit(
    tmp_path: Path, own_redis: EmbeddedRedis, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(12 * MiB)
    data_dir = tmp_path / "small"
    with faultfs.server_on_small_disk(data_dir, "8m", "--redis-url", own_redis.url) as server:
        url = await create(http, server.url, len(source))
        other = await create(http, server.url, MiB)
        async with http.patch(url, data=io.BytesIO(source[: 3 * MiB]), headers=patch_headers(0)):
            pass
        assert await offset_of(http, url) == 3 * MiB
        # 9 MiB more cannot fit in the 5 MiB left
        async with raw_patch(url, 3 * MiB, 9 * MiB) as request:
            answer = await send_until_answered(request, source[3 * MiB :])
        assert answer is not None, "no answer to the PATCH that filled the disk"
        assert answer.status == 507
        assert b"disk is full" in answer.body
        committed = await offset_of(http, url)
        assert committed in (3 * MiB, 7 * MiB)  # a commit may fall on the first 4 MiB block
        on_disk = faultfs.seen_by(server, file_of(data_dir, url)).read_bytes()
        assert on_disk[:committed] == source[:committed]
        assert (await head(http, other)).status == 200  # the other upload is fine

        # the next PATCH cuts the uncommitted bytes off, which frees the disk again
        resumed = io.BytesIO(source[committed : committed + MiB])
        async with http.patch(url, data=resumed, headers=patch_headers(committed)) as response:
            assert response.status == 204
        async with http.patch(other, data=os.urandom(MiB), headers=patch_headers(0)) as response:
            assert response.status == 204
        on_disk = faultfs.seen_by(server, file_of(data_dir, url)).read_bytes()
        assert on_disk == source[: committed + MiB]


@pytest.mark.usefixtures("small_disk_ok")
async def test_min_free_disk_refuses_a_write_before_the_disk_is_full(
    tmp_path: Path, own_redis: EmbeddedRedis, http: aiohttp.ClientSession
) -> None:
    source = os.urandom(4 * MiB)
    data_dir = tmp_path / "small"
    with faultfs.server_on_small_disk(
        data_dir, "8m", "--redis-url", own_redis.url, "--min-free-disk", "5MiB"
    ) as server:
        url = await create(http, server.url, len(source))
        async with http.patch(url, data=source[:MiB], headers=patch_headers(0)) as response:
            assert response.status == 204  # 7 MiB stay free
        # 3 MiB more would leave 4 MiB free, under the minimum: refused before writing
        async with raw_patch(url, MiB, 3 * MiB) as request:
            answer = await send_until_answered(request, source[MiB:])
        assert answer is not None and answer.status == 507
        assert b"low on disk space" in answer.body
        assert await offset_of(http, url) == MiB
        assert faultfs.seen_by(server, file_of(data_dir, url)).stat().st_size == MiB


async def test_min_free_disk_above_the_free_space_refuses_new_uploads(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(min_free_disk_bytes=2**60)
    async with http.post(server.url, headers={**TUS, "Upload-Length": "10"}) as response:
        assert response.status == 507
        assert "low on disk space" in await response.text()


# -- 8: SIGKILL durability ---------------------------------------------------------------


@pytest.mark.parametrize("fsync", ["always", "never"])
async def test_after_sigkill_the_committed_bytes_are_on_disk_and_the_upload_resumes(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
    fsync: str,
) -> None:
    data_dir = tmp_path_factory.mktemp("durable") / "data"
    server = await start_server(processes, data_dir, "--fsync", fsync)
    source = os.urandom(11 * MiB)
    url = await create(http, server.url, len(source))
    path = file_of(data_dir, url)
    async with raw_patch(url, 0, len(source)) as request:
        await request.send(source[: 9 * MiB])
        deadline = time.monotonic() + 10  # until the server wrote its second 4 MiB block
        while path.stat().st_size < 2 * BLOCK_BYTES:
            assert time.monotonic() < deadline, "the server wrote nothing"
            await asyncio.sleep(0.01)
        server.stop(signal.SIGKILL)
    written = path.stat().st_size

    server = await start_server(processes, data_dir, "--fsync", fsync)
    url = on(server, url)
    committed = await offset_of(http, url)
    assert committed <= written
    assert path.read_bytes()[:committed] == source[:committed]
    statuses = await finish_upload(http, url, source)  # 423s while the dead holder's lock lasts
    assert await completed_digest(http, url) == repr_digest_of(source)
    assert path.read_bytes() == source  # the uncommitted tail was cut, then written again
    print(f"committed {committed} of {written} bytes on disk; then {statuses}")


# -- 9: SIGTERM -------------------------------------------------------------------------


async def test_sigterm_commits_what_arrived_answers_503_and_stops_its_valkey(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
) -> None:
    data_dir = tmp_path_factory.mktemp("term") / "data"
    server = await start_server(processes, data_dir)
    valkey_pid = int((data_dir / "redis" / "valkey.pid").read_text())
    source = os.urandom(8 * MiB)
    url = await create(http, server.url, len(source))
    path = file_of(data_dir, url)
    async with raw_patch(url, 0, len(source)) as request:
        await stream_paced(request, source[: 5 * MiB], chunk=SLOW_CHUNK, pause_s=0.002)
        deadline = time.monotonic() + 10  # until the server wrote its first 4 MiB block
        while path.stat().st_size < BLOCK_BYTES:
            assert time.monotonic() < deadline, "the server wrote nothing"
            await asyncio.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        try:
            answer: RawResponse | None = await request.response(timeout_s=15)
        except (OSError, asyncio.IncompleteReadError):
            answer = None  # the connection closed: also fine for a client
    assert answer is None or answer.status == 503, answer
    if answer is not None:
        assert int(answer.headers["retry-after"]) > 0
    assert await asyncio.to_thread(server.process.wait, 20) == 0, server.log()
    assert pid_is_gone(valkey_pid), "the embedded Valkey outlived its supervisor"

    server = await start_server(processes, data_dir)
    url = on(server, url)
    committed = await offset_of(http, url)
    assert BLOCK_BYTES <= committed <= 5 * MiB  # everything read before SIGTERM is kept
    assert path.read_bytes()[:committed] == source[:committed]
    assert await finish_upload(http, url, source) == [204]  # no stale lock: it let go
    assert await completed_digest(http, url) == repr_digest_of(source)


async def sigterm_mid_small_body(
    server: ServerProcess, url: str, method: str, headers: Mapping[str, str], sent: bytes
) -> tuple[RawResponse, int]:
    """Start a small-body request with `Expect: 100-continue`, send `sent` once the handler
    reads the body, SIGTERM the server; its answer (a 503, checked) and the bytes it says it
    committed. The server has stopped cleanly when this returns."""
    request = await RawRequest.start(url, method, {**headers, "Expect": "100-continue"})
    try:
        assert (await request.response()).status == 100  # the handler is reading the body
        await request.send(sent)
        server.process.send_signal(signal.SIGTERM)
        answer = await request.response(timeout_s=30)
    finally:
        await request.close()
    assert answer.status == 503, answer
    assert int(answer.headers["retry-after"]) > 0
    kept = int(answer.body.split(b"; ")[1].split()[0])  # "...; N bytes are committed"
    assert 0 <= kept <= len(sent)
    assert await asyncio.to_thread(server.process.wait, 20) == 0, server.log()
    return answer, kept


# -- an idle timeout that fires in the middle of a block write ---------------------------


async def test_an_idle_timeout_during_a_block_write_keeps_the_sha256_right(
    tmp_path: Path,
    processes: StartProcess,
    own_redis: EmbeddedRedis,
    http: aiohttp.ClientSession,
) -> None:
    # A 4 ms idle timeout never fires between chunks of a fast local client, but it does while
    # the server writes and hashes a 4 MiB block (a slow disk does the same to --idle-timeout
    # 1s). The resumed PATCHes run on the same process, which reuses its running hash.
    server = await start_server(
        processes, tmp_path / "data", "--redis-url", own_redis.url, "--idle-timeout", "4ms"
    )
    source = os.urandom(24 * MiB)
    url = await create(http, server.url, len(source))
    statuses: list[int] = []
    deadline = time.monotonic() + DEADLINE_S
    while (offset := await offset_of(http, url)) < len(source):
        assert time.monotonic() < deadline, statuses
        async with raw_patch(url, offset, len(source) - offset) as request:
            answer = await send_until_answered(request, source[offset:], chunk=MiB)
        assert answer is not None and answer.status in (204, 408), answer
        statuses.append(answer.status)
    assert file_of(server.data_dir, url).read_bytes() == source
    assert await completed_digest(http, url) == repr_digest_of(source), f"after {statuses}"
