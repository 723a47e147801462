"""`tusserver --workers 2`: one listening socket shared by two forked workers under a
supervisor that owns the embedded Valkey; uploads work whichever worker a request lands on;
SIGTERM stops them all. And --idle-timeout: a stalled body gets 408 and keeps its bytes.

Which worker serves a connection is read from /proc (the worker holding the connection's
socket), so this file runs on Linux only.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import TUS, ServerProcess, wait_until
from tests.test_faults import (
    MiB,
    RawRequest,
    StartProcess,
    completed_digest,
    create,
    file_of,
    offset_of,
    pid_is_gone,
    raw_patch,
    repr_digest_of,
    send_until_answered,
    start_server,
)
from tests.test_faults import http as http

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")

TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"


def children_of(pid: int) -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                children.add(int(entry))
    return children


def socket_inodes_of(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_socket_inode(local_port: int, remote_port: int | None) -> int:
    """The inode of the IPv4 socket on 127.0.0.1:`local_port`: the listening one (remote
    None) or the one connected to 127.0.0.1:`remote_port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        if int(local.split(":")[1], 16) != local_port:
            continue
        if remote_port is None and state == TCP_LISTEN:
            return inode
        if remote_port is not None and state == TCP_ESTABLISHED:
            if int(remote.split(":")[1], 16) == remote_port:
                return inode
    raise AssertionError(f"no socket on port {local_port} (peer {remote_port})")


def port_of(server: ServerProcess) -> int:
    return int(server.url.split("/")[2].rsplit(":", 1)[1])


def worker_of(server: ServerProcess, request: RawRequest, workers: set[int]) -> int:
    """The pid of the worker holding the server side of `request`'s open connection."""
    client_port = request.writer.get_extra_info("sockname")[1]
    inode = tcp_socket_inode(port_of(server), client_port)
    owners = [pid for pid in workers if inode in socket_inodes_of(pid)]
    assert len(owners) == 1, owners
    return owners[0]


async def test_two_workers_share_one_socket_serve_any_request_and_stop_on_sigterm(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
) -> None:
    data_dir = tmp_path_factory.mktemp("workers") / "data"
    server = await start_server(processes, data_dir, "--workers", "2", "--idle-timeout", "1s")
    supervisor = server.process.pid
    valkey = int((data_dir / "redis" / "valkey.pid").read_text())

    # the listener is announced before the workers are forked: wait for them to exist
    async def workers_forked() -> bool:
        return len(children_of(supervisor)) >= 3

    await wait_until(workers_forked, timeout_s=20)
    children = children_of(supervisor)
    assert valkey in children  # the supervisor owns the embedded Valkey
    workers = children - {valkey}
    assert len(workers) == 2, children
    listening = tcp_socket_inode(port_of(server), None)
    assert all(listening in socket_inodes_of(pid) for pid in workers)  # one socket, shared

    # an upload in pieces, each PATCH on a new connection, to whichever worker accepts it
    source = os.urandom(5 * MiB + 7)
    url = await create(http, server.url, len(source))
    served: collections.Counter[int] = collections.Counter()
    cuts = [0, MiB, 2 * MiB + 3, 4 * MiB, len(source)]
    for start, end in itertools.pairwise(cuts):
        async with raw_patch(url, start, end - start) as request:
            answer = await send_until_answered(request, source[start:end])
            assert answer is not None and answer.status == 204, answer
            served[worker_of(server, request, workers)] += 1
    assert await completed_digest(http, url) == repr_digest_of(source)
    assert file_of(data_dir, url).read_bytes() == source
    for _ in range(100):  # until both workers have answered (the kernel picks, not us)
        if len(served) == 2:
            break
        async with contextlib.AsyncExitStack() as stack:
            request = await RawRequest.start(url, "HEAD", TUS)
            stack.push_async_callback(request.close)
            assert (await request.response()).status == 200
            served[worker_of(server, request, workers)] += 1
    assert set(served) == workers, served
    print(f"requests answered per worker: {dict(served)}")

    # --idle-timeout 1s: a body that stalls gets 408, and what arrived is committed
    stalled = await create(http, server.url, MiB)
    async with raw_patch(stalled, 0, MiB) as request:
        await request.send(source[: 100 * 1024])
        answer = await request.response(timeout_s=15)
    assert answer.status == 408, answer
    assert b"stalled" in answer.body
    assert await offset_of(http, stalled) == 100 * 1024

    server.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.process.wait, 30) == 0, server.log()
    for pid in (*workers, valkey):
        assert pid_is_gone(pid), f"pid {pid} outlived the supervisor"
