"""Issue 18, defect 1: what a connection may cost before its request is known. A header block
is bounded in bytes (--max-header-size: 431 and a close) and in time (--header-timeout: 408
and a close, also for a connection that sends nothing); an idle keep-alive connection is
closed (--keepalive-timeout); connections past --max-connections are answered 503 and closed
at once. And the proof the issue asks for: forty connections holding unfinished header blocks
leave a real tusserver process's memory where it was, and it answers meanwhile.

Requests are written byte by byte on plain sockets (tests/support/raw_http.py): an HTTP client
would finish every header block it starts.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import ServerProcess, StartProcess, start_server, tusserver_process
from tests.support.raw_http import (
    RawRequest,
    RawResponse,
    authority_of,
    exchange,
    request_bytes,
    send_until_answered,
)
from tests.support.servers import Server, ServerFactory
from tests.support.tus import TUS
from tests.support.waiting import wait_until

KiB, MiB = 2**10, 2**20
DEFAULT_MAX_HEADER_BYTES = 96 * KiB


def header_lines(count: int, size: int) -> bytes:
    """`count` header lines of about `size` bytes each, one after the other (no end)."""
    return b"".join(b"X-Pad-%03d: %s\r\n" % (n, b"a" * (size - 14)) for n in range(count))


def uploads_on_disk(server: Server) -> list[Path]:
    return sorted((server.settings.data_dir / "uploads").glob("*/*"))


async def send_in_pieces_past(request: RawRequest, piece: bytes, limit: int) -> RawResponse:
    """Send `piece` again and again, each once the server has read the one before (so each
    reaches it in a read of its own), until the server answers or more than `limit` bytes
    are sent; then its answer. Past `limit` nothing more is sent: the server has read every
    byte, so its close sends no reset that could overtake its answer."""
    answer = asyncio.create_task(request.response(timeout_s=30))
    try:
        while request.sent <= limit and not answer.done():
            await request.send(piece)
            await wait_until(
                lambda: answer.done() or request.is_read_or_closed_by_server(),
                every_s=0.005,
                what="the server read a piece",
            )
        return await answer
    finally:
        answer.cancel()


# -- the size of a header block: 431 --------------------------------------------------------


async def test_a_header_block_past_the_limit_in_pieces_is_431_and_closed(server: Server) -> None:
    """Lines far below the per-line limit, sent one by one and never ending the block: the
    total is what counts (the default limit, 96 KiB)."""
    request = await RawRequest.connect(server.url)
    try:
        await request.send(f"GET /health HTTP/1.1\r\nHost: {authority_of(server.url)}\r\n".encode())
        # lines of 2000 bytes: 50 pass the limit (aiohttp allows 128 lines)
        answer = await send_in_pieces_past(request, header_lines(1, 2000), DEFAULT_MAX_HEADER_BYTES)
        assert answer.status == 431, answer
        assert request.sent > DEFAULT_MAX_HEADER_BYTES  # not before the block passed the limit
        assert answer.headers["connection"] == "close"
        assert await request.rest_until_closed() == b""
    finally:
        await request.close()


async def test_a_complete_header_block_past_the_limit_is_431_and_nothing_is_created(
    make_server: ServerFactory,
) -> None:
    server = await make_server(max_header_bytes=8 * KiB)
    host = authority_of(server.url)
    creation = [("Host", host), *TUS.items(), ("Upload-Length", "5")]
    under = request_bytes("POST", "/files/", [*creation, ("X-Pad", "a" * 7000)])
    assert (await exchange(server.url, under)).status == 201  # a block under the limit is fine
    created = uploads_on_disk(server)
    pads = [(f"X-Pad-{n}", "a" * 1000) for n in range(9)]  # 9 KB, no line over 1 KB
    over = request_bytes("POST", "/files/", [*creation, *pads])
    request = await RawRequest.connect(server.url)
    try:
        await request.send(over)  # one write: the block is complete in the first read
        answer = await request.response()
        assert answer.status == 431, answer
        assert await request.rest_until_closed() == b""
    finally:
        await request.close()
    assert uploads_on_disk(server) == created  # the handler never ran


# -- the time of a header block: 408 --------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [b"", b"POST /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\nUpload-Length: 5\r\n"],
    ids=["nothing", "an unfinished block"],
)
async def test_a_header_block_not_complete_in_time_is_408_and_closed(
    make_server: ServerFactory, sent: bytes
) -> None:
    """Also a connection that sends nothing at all."""
    server = await make_server(header_timeout_s=0.5)
    request = await RawRequest.connect(server.url)
    try:
        await request.send(sent)
        answer = await request.response()
        assert answer.status == 408, answer
        assert answer.headers["connection"] == "close"
        assert await request.rest_until_closed() == b""
    finally:
        await request.close()
    assert uploads_on_disk(server) == []


async def test_header_lines_trickling_in_do_not_keep_the_connection_open(
    make_server: ServerFactory,
) -> None:
    """A slowloris: each new line would reset a per-read timer; the header timeout counts from
    the block's first byte."""
    server = await make_server(header_timeout_s=1)
    request = await RawRequest.connect(server.url)
    answer = asyncio.create_task(request.response(timeout_s=30))
    try:
        await request.send(b"GET /health HTTP/1.1\r\n")
        for line in range(200):  # up to 20 s of lines, one every 0.1 s (a slow client)
            if answer.done():
                break
            await request.send(b"X-Line-%d: a\r\n" % line)
            await asyncio.sleep(0.1)
        assert (await answer).status == 408
        assert await request.rest_until_closed() == b""
    finally:
        answer.cancel()
        await request.close()


async def test_a_keep_alive_connection_idle_past_the_keepalive_timeout_is_closed(
    make_server: ServerFactory,
) -> None:
    server = await make_server(keepalive_timeout_s=0.5)
    request = await RawRequest.connect(server.url)
    health = request_bytes("GET", "/health", [("Host", authority_of(server.url))])
    try:
        for _ in range(2):  # the connection is kept between requests
            await request.send(health)
            answer = await request.response()
            assert answer.status == 200
            assert answer.headers.get("connection", "keep-alive").lower() != "close"
        # the default (75 s) would outlast this wait
        assert await request.rest_until_closed(timeout_s=20) == b""
    finally:
        await request.close()


# A header block that starts in the same read as the end of the request before it (a client
# pipelining, or one that sends its next request at once) is timed and counted from that read.


async def test_an_unfinished_header_block_after_a_pipelined_request_is_408(
    make_server: ServerFactory,
) -> None:
    """Were it not timed, only the keep-alive timeout (75 s by default, 2 s here) would end
    the connection, and without an answer."""
    server = await make_server(header_timeout_s=0.5, keepalive_timeout_s=2)
    health = request_bytes("GET", "/health", [("Host", authority_of(server.url))])
    request = await RawRequest.connect(server.url)
    try:
        await request.send(health + b"GET /health HTTP/1.1\r\nX-Unfinished: 1\r\n")
        assert (await request.response()).status == 200
        assert (await request.response()).status == 408
    finally:
        await request.close()


async def test_a_header_block_after_a_pipelined_request_past_the_limit_is_431(
    make_server: ServerFactory,
) -> None:
    """6 KB in the read that ends the first request, 6 KB more: past the 8 KiB limit. Were
    only the second read counted, the header timeout would answer instead, later."""
    server = await make_server(max_header_bytes=8 * KiB, header_timeout_s=1)
    health = request_bytes("GET", "/health", [("Host", authority_of(server.url))])
    request = await RawRequest.connect(server.url)
    try:
        await request.send(health + b"GET /health HTTP/1.1\r\n" + header_lines(6, 1000))
        assert (await request.response()).status == 200
        await wait_until(request.is_read_or_closed_by_server, what="the server read it all")
        await request.send(header_lines(6, 1000))
        assert (await request.response()).status == 431
    finally:
        await request.close()


# -- open connections: 503 --------------------------------------------------------------------


async def test_connections_past_the_maximum_are_503_and_closed_until_one_goes(
    make_server: ServerFactory,
) -> None:
    server = await make_server(max_connections=3)
    health = request_bytes("GET", "/health", [("Host", authority_of(server.url))])
    held = [await RawRequest.connect(server.url) for _ in range(3)]
    try:
        extra = await RawRequest.connect(server.url)
        try:
            answer = await extra.response()
            assert answer.status == 503, answer
            assert answer.headers["connection"] == "close"
            assert await extra.rest_until_closed() == b""
        finally:
            await extra.close()
        await held.pop().close()

        async def answered_again() -> bool:  # once the server has seen that close
            return (await exchange(server.url, health)).status == 200

        await wait_until(answered_again, what="a new connection answered after one closed")
    finally:
        for request in held:
            await request.close()


# -- unfinished header blocks and memory: a real tusserver process ----------------------------


@pytest.fixture(scope="module")
def guarded_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A tusserver process with a short header timeout, for the memory tests."""
    yield from tusserver_process(
        tmp_path_factory.mktemp("limits") / "data", "--header-timeout", "5s"
    )


def rss_bytes(pid: int) -> tuple[int, int]:
    """The resident memory of process `pid` now and at its peak (VmRSS, VmHWM), in bytes."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(fields["VmRSS"].split()[0]) * KiB, int(fields["VmHWM"].split()[0]) * KiB


def assert_memory_kept(pid: int, before: tuple[int, int], during: list[int]) -> None:
    """The process's memory stayed within 50 MiB of `before` (its VmRSS and VmHWM then): in
    each of the `during` samples, now, and at its peak since `before` (if it set a new one)."""
    rss_before, peak_before = before
    rss_now, peak_now = rss_bytes(pid)
    limit = rss_before + 50 * MiB
    assert max([*during, rss_now]) <= limit, (rss_before, during, rss_now)
    assert peak_now <= max(peak_before, limit), (rss_before, peak_before, peak_now)


async def answer_to(url: str, request: bytes) -> int:
    return (await exchange(url, request, timeout_s=10)).status


@pytest.mark.slow
async def test_forty_header_blocks_growing_past_the_limit_are_cut_off_without_memory(
    guarded_process: ServerProcess,
) -> None:
    """The issue's attack: forty connections send header lines of 64 KiB (under the old
    per-line limit of 128 KiB), up to 100 of them each, and never end the block. The server
    that had no limit on the whole block held them all (48 MiB became 559 MiB, and 153 MiB
    stayed after they closed); now each is answered 431 once past 96 KiB and closed, and
    the process's memory (the embedded Valkey is another process) stays within 50 MiB."""
    server, pid = guarded_process, guarded_process.process.pid
    before = rss_bytes(pid)
    lines = header_lines(100, 64 * KiB)
    held = [await RawRequest.connect(server.url) for _ in range(40)]
    try:
        for request in held:
            await request.send(b"GET /health HTTP/1.1\r\n")
        answers = await asyncio.gather(
            *(send_until_answered(request, lines, chunk=64 * KiB) for request in held)
        )
        during = [rss_bytes(pid)[0]]
        health = request_bytes("GET", "/health", [("Host", authority_of(server.url))])
        assert await answer_to(server.url, health) == 200
        # the 431 may be lost to the reset that closing a socket with unread bytes sends
        assert {None if answer is None else answer.status for answer in answers} <= {431, None}
        for request in held:
            assert await request.rest_until_closed() == b""
    finally:
        for request in held:
            await request.close()
    assert server.process.poll() is None, server.log()
    assert_memory_kept(pid, before, during)


@pytest.mark.slow
async def test_forty_unfinished_header_blocks_are_held_cheaply_until_the_header_timeout(
    guarded_process: ServerProcess,
) -> None:
    """40 connections each send 90 header lines of 1000 bytes (90 KB, under the 96 KiB
    limit, so none is refused for its size) and never end the block: the process's memory
    stays within 50 MiB of where it started, it answers a normal request meanwhile, and the
    header timeout (5 s here) closes every one of them with a 408. (Each block goes in two
    writes, all of them at once: the server has read every byte long before its timeout, so
    its close sends no reset that could overtake the 408.)"""
    server, pid = guarded_process, guarded_process.process.pid
    before = rss_bytes(pid)
    block = b"GET /health HTTP/1.1\r\n" + header_lines(90, 1000)
    held = [await RawRequest.connect(server.url) for _ in range(40)]
    answers = [asyncio.create_task(request.response(timeout_s=60)) for request in held]
    try:
        for half in (block[: len(block) // 2], block[len(block) // 2 :]):
            for request in held:
                await request.send(half)
        await wait_until(
            lambda: all(request.is_read_or_closed_by_server() for request in held),
            what="the server read every header line sent",
        )
        during = [rss_bytes(pid)[0]]
        assert not any(answer.done() for answer in answers)  # all held, none refused yet

        health = request_bytes("GET", "/health", [("Host", authority_of(server.url))])
        assert await answer_to(server.url, health) == 200
        head = request_bytes(
            "HEAD", "/files/" + "0" * 32, [("Host", authority_of(server.url)), *TUS.items()]
        )
        assert (await exchange(server.url, head, has_body=False)).status == 404

        assert [(await answer).status for answer in answers] == [408] * 40
        for request in held:
            assert await request.rest_until_closed() == b""
    finally:
        for answer in answers:
            answer.cancel()
        for request in held:
            await request.close()
    assert server.process.poll() is None, server.log()
    assert_memory_kept(pid, before, during)


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's accept queue")
async def test_the_kernel_queues_a_burst_of_connections_while_the_server_takes_none(
    tmp_path: Path, processes: StartProcess
) -> None:
    """Phones connecting by the thousand: what a process has not accepted yet waits in the
    kernel's queue of the listening socket, 4096 long. Past its length the kernel drops the
    handshake and the client tries again only a second or more later. (asyncio listens
    again with the site's backlog, aiohttp's default 128, unless given ours.) A stopped
    process accepts none, so every connection that completes meanwhile is in that queue."""
    server = await start_server(processes, tmp_path / "data")
    connecting: list[asyncio.Task[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = []
    server.process.send_signal(signal.SIGSTOP)
    try:
        connecting = [
            asyncio.ensure_future(asyncio.open_connection("127.0.0.1", server.port))
            for _ in range(400)
        ]
        await wait_until(
            lambda: all(task.done() for task in connecting), what="400 connections queued"
        )
    finally:
        server.process.send_signal(signal.SIGCONT)
        await asyncio.gather(*connecting, return_exceptions=True)
    streams = [task.result() for task in connecting]
    try:
        for reader, writer in streams[-3:]:  # the last queued are served once it runs again
            writer.write(b"OPTIONS /files/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status_line = await asyncio.wait_for(reader.readline(), 30)
            assert status_line.startswith(b"HTTP/1.1 204"), status_line
    finally:
        for _reader, writer in streams:
            writer.close()
