"""deploy/nginx.conf in front of a real tusserver: Debian's nginx binary (not daemonized, its
logs, pid and temp files in the test's folder) proxies to a tusserver process listening on a
unix socket with --behind-proxy. Through nginx: the Location is nginx's public URL (spoofed
forwarding headers from the client do not change it), HEAD, a 4xx reason, request ids, the
health, readiness and metrics endpoints, a 64 MiB PATCH that reaches tusserver while it is
being sent (nothing written to nginx's temp folder, nginx's memory small), and a PATCH cut off
midway that the client resumes."""

from __future__ import annotations

import asyncio
import hashlib
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

from tests.support.processes import StartProcess, free_port, start_server
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

    async def tusserver_has_bytes() -> bool:
        return await head_offset(client, url) >= MiB

    await wait_until(tusserver_has_bytes, 30, what="bytes through nginx")
    request.writer.transport.abort()  # the client is cut off mid-body
    await request.close()

    offsets: list[int] = []

    async def resumed() -> bool:  # what a tus client does: HEAD, PATCH the rest, again on 409
        offset = await head_offset(client, url)
        offsets.append(offset)
        response = await patch(client, url, offset, data[offset:])
        assert response.status in (204, 409, 423), (response.status, await response.text())
        return response.status == 204

    await wait_until(resumed, 30, every_s=0.1, what="the resumed PATCH accepted")
    assert 0 < offsets[0] < len(data), offsets
    assert await completed_digest(client, url) == repr_digest_of(data)
