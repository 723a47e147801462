"""deploy/nginx.conf in front of real tusserver processes: Debian's nginx binary (not
daemonized, its logs, pid and temp files in the test's folder) proxies to tusserver processes
listening on unix sockets with --behind-proxy.

One process: the Location is nginx's public URL (spoofed forwarding headers from the client
do not change it), HEAD, a 4xx reason, request ids, the health, readiness and metrics
endpoints, a 64 MiB PATCH that reaches tusserver while it is being sent (nothing written to
nginx's temp folder, nginx's memory small), and a PATCH cut off midway that the client resumes.

Two processes on one Redis and one data directory, both in nginx's upstream (what
docker-compose.yml runs, without containers): PATCHes of one upload alternate between them
(each process's access log and nginx's upstream address show it) and the upload completes
with the right SHA-256 at nginx's public URL; a 1 GiB PATCH streams through unbuffered (HEAD
shows the bytes while the client still sends, nothing in nginx's temp folder, its peak memory
small); and killing the process that holds an upload mid-PATCH lets the client resume through
the other."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from tests.support.faults import finish_upload
from tests.support.files import distinct_blocks
from tests.support.processes import ServerProcess, StartProcess, free_port, start_server
from tests.support.raw_http import RawRequest
from tests.support.tools import has_tool, require_tool
from tests.support.tus import (
    TUS,
    completed_digest,
    create_upload,
    head_offset,
    patch,
    repr_digest_of,
    upload_id_of,
)
from tests.support.waiting import wait_until, wait_until_sync
from tusserver.store.embedded import EmbeddedRedis
from tusserver.store.records import redis_key, shard_of

SHIPPED_CONF = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
MiB = 1024 * 1024


def render(template: str, values: Mapping[str, str]) -> str:
    """The shipped template with its ${NAME} placeholders filled (as envsubst would)."""
    for name, value in values.items():
        assert "${" + name + "}" in template, name
        template = template.replace("${" + name + "}", value)
    assert "${" not in template, "a placeholder the test does not know"
    return template


def main_conf(prefix: Path) -> str:
    """What the main nginx.conf of a distribution holds around conf.d: here with the pid, the
    logs and every temp folder in `prefix`, so nginx needs no root and touches nothing else."""
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    temp = prefix / "temp"
    return f"""
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    include {prefix}/tusserver.conf;
}}
"""


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    prefix: Path
    port: int

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"{self.public_url}/files/"

    def access_log(self) -> str:
        return (self.prefix / "logs" / "access.log").read_text(errors="replace")

    def error_log(self) -> str:
        return (self.prefix / "logs" / "error.log").read_text(errors="replace")

    def body_temp_files(self) -> list[Path]:
        return [path for path in (self.prefix / "temp").rglob("*") if path.is_file()]

    def peak_memory_kib(self) -> int:
        """The largest peak resident size (VmHWM) among nginx's master and workers."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        peaks = []
        for each in [pid, *map(int, children)]:
            status = Path(f"/proc/{each}/status").read_text()
            match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
            assert match is not None, status
            peaks.append(int(match.group(1)))
        return max(peaks)


def accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_nginx(prefix: Path, upstream: str) -> Nginx:
    binary = shutil.which("nginx")
    assert binary is not None
    for folder in ("logs", "temp"):
        (prefix / folder).mkdir(parents=True)
    port = free_port()
    shipped = render(
        SHIPPED_CONF.read_text(),
        {
            "TUS_UPSTREAM": upstream,
            "NGINX_PORT": f"127.0.0.1:{port}",
            "NGINX_ACCESS_LOG": str(prefix / "logs" / "access.log"),
        },
    )
    (prefix / "tusserver.conf").write_text(shipped)
    (prefix / "nginx.conf").write_text(main_conf(prefix))
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
         "-e", str(prefix / "logs" / "error.log"), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    nginx = Nginx(process, prefix, port)
    wait_until_sync(
        lambda: accepts_connections(port) or process.poll() is not None,
        what=lambda: f"nginx listening on {port}",
    )
    assert process.poll() is None, nginx.error_log()
    return nginx


def stop_nginx(nginx: Nginx) -> None:
    if nginx.process.poll() is None:
        nginx.process.send_signal(signal.SIGQUIT)  # graceful: the workers finish, then exit
        try:
            nginx.process.wait(10)
        except subprocess.TimeoutExpired:
            nginx.process.kill()
            nginx.process.wait()


@pytest.fixture
def nginx_binary() -> None:
    require_tool(has_tool("nginx"), "nginx (Debian's nginx-light; .ci/install-tools.sh)")


@pytest.fixture
async def nginx(
    nginx_binary: None, tmp_path: Path, processes: StartProcess
) -> AsyncIterator[Nginx]:
    socket_path = tmp_path / "tus.sock"
    await start_server(
        processes, tmp_path / "data", "--unix-socket", str(socket_path), "--behind-proxy"
    )
    proxy = await asyncio.to_thread(start_nginx, tmp_path / "nginx", f"unix:{socket_path}")
    try:
        yield proxy
    finally:
        await asyncio.to_thread(stop_nginx, proxy)


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


def payload(size: int) -> bytes:
    return hashlib.shake_256(str(size).encode()).digest(size)


async def test_the_upload_url_head_reasons_and_request_ids_through_nginx(
    nginx: Nginx, client: aiohttp.ClientSession
) -> None:
    spoofed = {
        "Forwarded": "host=evil.example;proto=https",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Prefix": "/evil",
    }
    url = await create_upload(client, nginx.endpoint, 10, **spoofed)
    assert url == f"{nginx.public_url}/files/{upload_id_of(url)}"
    assert await head_offset(client, url) == 0
    assert (await patch(client, url, 0, b"hello")).status == 204
    assert await head_offset(client, url) == 5

    wrong = await patch(client, url, 2, b"world")
    assert wrong.status == 409
    assert (await wrong.text()).strip() == "Upload-Offset is 2, the upload is at 5"
    assert wrong.headers["Upload-Offset"] == "5"

    async with client.head(url, headers={**TUS, "X-Request-Id": "nginx-test-1"}) as echoed:
        assert echoed.headers["X-Request-Id"] == "nginx-test-1"
    async with client.head(url, headers=TUS) as generated:
        request_id = generated.headers["X-Request-Id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id), request_id  # nginx's $request_id

    def logged() -> bool:
        log = nginx.access_log()
        return f"request_id={request_id}" in log and "request_id=nginx-test-1" in log

    await wait_until(logged, what=lambda: f"both request ids in\n{nginx.access_log()}")

    for path in ("/health", "/ready"):
        async with client.get(nginx.public_url + path) as response:
            assert response.status == 200, (path, await response.text())
            assert response.content_type == "application/json"
    async with client.get(nginx.public_url + "/metrics") as metrics:  # loopback is allowed
        assert metrics.status == 200
        assert "tusserver_requests_total" in await metrics.text()
    async with client.get(nginx.public_url + "/elsewhere") as elsewhere:
        assert elsewhere.status == 404


async def test_a_64_mib_patch_reaches_tusserver_while_it_is_sent(
    nginx: Nginx, client: aiohttp.ClientSession
) -> None:
    data = payload(64 * MiB)
    url = await create_upload(client, nginx.endpoint, len(data))
    request = await RawRequest.patch(url, 0, len(data))
    try:
        await request.send(data[: 16 * MiB])

        async def tusserver_has_bytes() -> bool:
            return await head_offset(client, url) >= MiB

        # with request buffering on, nginx would hold the body (in a temp file) until its end
        await wait_until(tusserver_has_bytes, 30, what="bytes through nginx before the end")
        assert nginx.body_temp_files() == []
        await request.send(data[16 * MiB :])
        response = await request.response(60)
        assert response.status == 204, response
        assert response.headers["upload-offset"] == str(len(data))
    finally:
        await request.close()
    assert await completed_digest(client, url) == repr_digest_of(data)
    assert nginx.body_temp_files() == []
    assert nginx.peak_memory_kib() < 32 * 1024, "nginx held the body in memory"


async def test_a_patch_cut_off_through_nginx_resumes(
    nginx: Nginx, client: aiohttp.ClientSession
) -> None:
    data = payload(16 * MiB)
    url = await create_upload(client, nginx.endpoint, len(data))
    request = await RawRequest.patch(url, 0, len(data))
    await request.send(data[: 6 * MiB])
    await _bytes_reached_tusserver(client, url)
    request.writer.transport.abort()  # the client is cut off mid-body
    await request.close()

    assert 0 < await head_offset(client, url) < len(data)
    await finish_upload(client, url, data, tolerated=(409, 423))
    assert await completed_digest(client, url) == repr_digest_of(data)


# -- two tusserver processes behind nginx: the docker-compose topology without containers --


@dataclass
class Topology:
    nginx: Nginx
    servers: list[ServerProcess]
    redis_url: str


@pytest.fixture
async def two_behind_nginx(
    nginx_binary: None, tmp_path: Path, processes: StartProcess, own_redis: EmbeddedRedis
) -> AsyncIterator[Topology]:
    """One Redis, two tusserver processes on one data directory (each on its own unix
    socket), nginx with the shipped config and both in its upstream, all on this machine."""
    sockets = [tmp_path / "a.sock", tmp_path / "b.sock"]
    flags = ("--behind-proxy", "--redis-url", own_redis.url)
    starting = [
        start_server(processes, tmp_path / "data", "--unix-socket", str(path), *flags)
        for path in sockets
    ]
    servers = list(await asyncio.gather(*starting))
    # two upstream servers through the one placeholder, as its comment shows
    upstream = f"unix:{sockets[0]}; server unix:{sockets[1]}"
    proxy = await asyncio.to_thread(start_nginx, tmp_path / "nginx", upstream)
    try:
        yield Topology(proxy, servers, own_redis.url)
    finally:
        await asyncio.to_thread(stop_nginx, proxy)


def served_by(servers: list[ServerProcess], request_id: str) -> list[int]:
    """The indexes of the processes whose access log has a line for `request_id`."""
    return [i for i, server in enumerate(servers) if f"rid={request_id}\n" in server.log()]


async def test_patches_alternate_between_two_processes_through_nginx(
    two_behind_nginx: Topology, client: aiohttp.ClientSession
) -> None:
    nginx, servers = two_behind_nginx.nginx, two_behind_nginx.servers
    data = payload(8 * MiB + 12345)
    url = await create_upload(client, nginx.endpoint, len(data))
    assert url == f"{nginx.public_url}/files/{upload_id_of(url)}"  # nginx's, not a socket's
    cuts = [0, MiB, 3 * MiB, 4 * MiB, 6 * MiB, 7 * MiB, len(data)]
    request_ids = [f"alternating-{turn}" for turn in range(len(cuts) - 1)]
    for request_id, start, end in zip(request_ids, cuts, cuts[1:], strict=False):
        answer = await patch(client, url, start, data[start:end], **{"X-Request-Id": request_id})
        assert answer.status == 204, await answer.text()
        assert answer.headers["Upload-Offset"] == str(end)
    assert await completed_digest(client, url) == repr_digest_of(data)

    async def all_logged() -> bool:
        return all(len(served_by(servers, rid)) == 1 for rid in request_ids)

    await wait_until(all_logged, what="each PATCH in one process's access log")
    order = [served_by(servers, rid)[0] for rid in request_ids]
    assert all(a != b for a, b in itertools.pairwise(order)), order  # alternated
    upstreams = re.findall(r"request_id=alternating-\d+ upstream=(\S+)", nginx.access_log())
    assert len(upstreams) == len(request_ids) and len(set(upstreams)) == 2, upstreams


async def test_a_1_gib_patch_streams_through_nginx_unbuffered(
    two_behind_nginx: Topology, client: aiohttp.ClientSession
) -> None:
    nginx = two_behind_nginx.nginx
    size, block = 1024 * MiB, 4 * MiB
    url = await create_upload(client, nginx.endpoint, size)
    sha256 = hashlib.sha256()
    request = await RawRequest.patch(url, 0, size)
    try:
        for index, data in enumerate(distinct_blocks(size // block, block)):
            sha256.update(data)
            await request.send(data)
            sent = (index + 1) * block
            if sent in (
                size // 4,
                size * 3 // 4,
            ):  # the server has bytes the client is still sending

                async def has_half_of_what_was_sent(sent: int = sent) -> bool:
                    return await head_offset(client, url) >= sent // 2

                await wait_until(has_half_of_what_was_sent, 60, what=f"half of {sent} bytes")
                assert nginx.body_temp_files() == []
                assert nginx.peak_memory_kib() < 32 * 1024, "nginx holds the body in memory"
        response = await request.response(120)
        assert response.status == 204, response
        assert response.headers["upload-offset"] == str(size)
    finally:
        await request.close()
    digest = base64.b64encode(sha256.digest()).decode()
    assert await completed_digest(client, url) == f"sha-256=:{digest}:"
    assert nginx.body_temp_files() == []
    assert nginx.peak_memory_kib() < 32 * 1024, "nginx held the body in memory"


async def test_killing_the_process_holding_an_upload_resumes_through_the_other(
    two_behind_nginx: Topology, client: aiohttp.ClientSession
) -> None:
    nginx, servers = two_behind_nginx.nginx, two_behind_nginx.servers
    data = payload(32 * MiB)
    url = await create_upload(client, nginx.endpoint, len(data))
    request = await RawRequest.patch(url, 0, len(data))
    await request.send(data[: 8 * MiB])
    await _bytes_reached_tusserver(client, url)
    holder = await lock_holder_pid(two_behind_nginx.redis_url, url)
    [victim] = [server for server in servers if server.process.pid == holder]
    os.kill(holder, signal.SIGKILL)
    assert victim.process.wait(10) == -signal.SIGKILL
    request.writer.transport.abort()
    await request.close()

    assert MiB <= await head_offset(client, url) < len(data)
    # 423 while the dead holder's lock lasts
    await finish_upload(client, url, data, tolerated=(409, 423))
    assert await completed_digest(client, url) == repr_digest_of(data)


async def lock_holder_pid(redis_url: str, url: str) -> int:
    """The pid of the process holding the upload's lock (its value is `host:pid:random`)."""
    upload_id = upload_id_of(url)
    async with aioredis.Redis.from_url(redis_url) as redis:
        holder = await redis.get(redis_key(shard_of(upload_id), "lock", upload_id))
    assert holder is not None, "nobody holds the upload"
    text = holder.decode() if isinstance(holder, bytes) else holder
    return int(text.split(":")[-2])


async def _bytes_reached_tusserver(client: aiohttp.ClientSession, url: str) -> None:
    """Wait until tusserver committed a MiB of a PATCH still being sent through nginx."""

    async def has_bytes() -> bool:
        return await head_offset(client, url) >= MiB

    await wait_until(has_bytes, 30, what="bytes through nginx")
