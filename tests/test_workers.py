"""`tusserver --workers 2`: two forked workers, each with its own listening socket on the
same port (SO_REUSEPORT, so the kernel spreads connections over them), under a supervisor
that owns the embedded Valkey; a port already taken is refused; uploads work whichever worker
a request lands on; SIGTERM stops them all. And --idle-timeout: a stalled body gets 408 and
keeps its bytes.

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

from tests.support.faults import MiB
from tests.support.files import file_of
from tests.support.processes import StartProcess, pid_is_gone, start_server
from tests.support.raw_http import RawRequest, raw_patch, send_until_answered
from tests.support.tus import TUS, completed_digest, create_upload, head_offset, repr_digest_of
from tests.support.waiting import wait_until
from tests.support.workers import children_of, socket_inodes_of, tcp_socket_inodes, worker_of

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc"),
    pytest.mark.fresh_connections,  # as in the fault suites: no pooled connection is reused
]


async def test_two_workers_listen_each_on_its_own_socket_share_connections_and_stop(
    tmp_path_factory: pytest.TempPathFactory,
    processes: StartProcess,
    http: aiohttp.ClientSession,
) -> None:
    data_dir = tmp_path_factory.mktemp("workers") / "data"
    server = await start_server(processes, data_dir, "--workers", "2", "--idle-timeout", "1s")
    supervisor = server.process.pid
    valkey = int((data_dir / "redis" / "valkey.pid").read_text())

    # the listener is announced before the workers are forked: wait for them to exist
    await wait_until(
        lambda: len(children_of(supervisor)) >= 3, timeout_s=20, what="two workers forked"
    )
    children = children_of(supervisor)
    assert valkey in children  # the supervisor owns the embedded Valkey
    workers = children - {valkey}
    assert len(workers) == 2, children
    listening = tcp_socket_inodes(server.port, None)
    assert len(listening) == 2, listening  # one socket per worker, on the same port
    owned = [listening & socket_inodes_of(pid) for pid in workers]
    assert all(len(inodes) == 1 for inodes in owned) and owned[0] != owned[1], owned

    # 32 connections opened at once land on both workers (with one shared socket, the worker
    # that woke first took them all); the kernel hashes each to a socket, so each worker
    # gets none with a chance of 2**-32
    async with contextlib.AsyncExitStack() as stack:
        requests = await asyncio.gather(
            *(RawRequest.start(server.url, "OPTIONS", TUS) for _ in range(32))
        )
        for request in requests:
            stack.push_async_callback(request.close)
        answers = await asyncio.gather(*(request.response() for request in requests))
        assert {answer.status for answer in answers} == {204}, answers
        spread = collections.Counter(worker_of(server, request, workers) for request in requests)
    assert set(spread) == workers, spread
    print(f"32 connections per worker: {dict(spread)}")

    # another server on the same port is refused, never let into the workers' group
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tusserver", "--port", str(server.port), "--workers", "2",
        "--data-dir", str(tmp_path_factory.mktemp("other") / "data"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(other.communicate(), 60)
    assert other.returncode == 1, output
    assert b"in use" in output, output

    # an upload in pieces, each PATCH on a new connection, to whichever worker accepts it
    source = os.urandom(5 * MiB + 7)
    url = await create_upload(http, server.url, len(source))
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
    stalled = await create_upload(http, server.url, MiB)
    async with raw_patch(stalled, 0, MiB) as request:
        await request.send(source[: 100 * 1024])
        answer = await request.response(timeout_s=15)
    assert answer.status == 408, answer
    assert b"stalled" in answer.body
    assert await head_offset(http, stalled) == 100 * 1024

    server.process.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(server.process.wait, 30) == 0, server.log()
    for pid in (*workers, valkey):
        assert pid_is_gone(pid), f"pid {pid} outlived the supervisor"


async def test_workers_stop_when_their_supervisor_is_killed(
    processes: StartProcess, tmp_path: Path
) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its workers: they
    notice they were orphaned and stop on their own, instead of serving on without it."""
    server = await start_server(processes, tmp_path / "data", "--workers", "2")
    supervisor = server.process.pid

    def workers_of_supervisor() -> set[int]:  # its children but the embedded Valkey
        return {
            pid for pid in children_of(supervisor)
            if "valkey" not in Path(f"/proc/{pid}/comm").read_text()
        }  # fmt: skip

    await wait_until(lambda: len(workers_of_supervisor()) == 2, what="two workers forked")
    workers = workers_of_supervisor()
    server.process.kill()
    server.process.wait()
    await wait_until(
        lambda: all(pid_is_gone(pid) for pid in workers), timeout_s=10,
        what="the orphaned workers stopped",
    )  # fmt: skip
