"""The aiohttp private details tusserver relies on (tusserver/aiohttp_private.py). If an
aiohttp upgrade renames or changes them, these tests fail loudly, instead of a hang-up losing
the bytes aiohttp had buffered or the access log miscounting."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import select

import aiohttp
import pytest
from aiohttp import StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.test_utils import make_mocked_request

from tests.support.servers import Server
from tests.support.tus import create_upload, patch_headers
from tests.support.waiting import wait_until
from tusserver.aiohttp_private import (
    CONTINUE,
    ConnectionLimits,
    FedStream,
    GuardedAppRunner,
    clear_error,
    close_after_taken_body,
    send_interim,
    take_body,
    unread_chunks,
)


def _stream() -> StreamReader:
    loop = asyncio.get_running_loop()
    return StreamReader(BaseProtocol(loop), limit=2**16, loop=loop)


async def test_a_fed_stream_pauses_its_feeder_past_twice_its_limit_until_read() -> None:
    fed = FedStream(limit=16)
    await fed.feed(b"x" * 33)  # past the high-water mark (2 * 16): the stream pauses
    feeding = asyncio.create_task(fed.feed(b"y"))
    await asyncio.wait({feeding}, timeout=0.2)  # bounded wait: it must not finish
    assert not feeding.done()
    assert await fed.stream.readany() == b"x" * 33  # below the low-water mark: resumed
    await feeding
    fed.end()
    assert await fed.stream.read() == b"y"
    assert fed.stream.at_eof()


async def test_a_fed_stream_wakes_a_reader_that_waits_for_it() -> None:
    fed = FedStream(limit=16)
    reading = asyncio.create_task(fed.stream.readany())
    await asyncio.wait({reading}, timeout=0.05)  # the reader is waiting, not refused
    assert not reading.done()
    await fed.feed(b"late")
    assert await reading == b"late"


async def test_a_fed_stream_hands_its_feeders_error_to_the_reader() -> None:
    fed = FedStream(limit=16)
    await fed.feed(b"ab")
    fed.end(ValueError("malformed"))
    with pytest.raises(ValueError, match="malformed"):
        await fed.stream.readany()
    assert unread_chunks(fed.stream) == [b"ab"]


async def test_unread_chunks_takes_what_a_failed_stream_still_buffers() -> None:
    stream = _stream()
    stream.feed_data(b"abc")
    assert await stream.readany() == b"abc"
    stream.feed_data(b"defg")
    assert await stream.read(2) == b"de"  # half of the second chunk handed out
    stream.feed_data(b"hij")
    stream.set_exception(ConnectionResetError())
    with pytest.raises(ConnectionResetError):
        await stream.readany()  # the stored error comes before the buffer
    assert unread_chunks(stream) == [b"fg", b"hij"]
    assert unread_chunks(stream) == []  # taken once
    assert stream._size == 0  # the stream's count of buffered bytes follows


async def test_clear_error_lets_the_stream_be_read_again() -> None:
    stream = _stream()
    stream.set_exception(RuntimeError("our wake-up"))
    clear_error(stream)
    assert stream.exception() is None
    stream.feed_data(b"rest")
    stream.feed_eof()
    assert await stream.read() == b"rest"


async def _patch_logged_bytes_out(
    server: Server, caplog: pytest.LogCaptureFixture, *, expect_continue: bool
) -> int:
    """bytes_out of the access log line of one small PATCH sent on a raw socket."""
    async with aiohttp.ClientSession() as http:
        url = await create_upload(http, server.url, length=3)
    path = url.split(server.url.split("/files/")[0], 1)[1]
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    headers = {**patch_headers(0), "Content-Length": "3", "Host": f"{host}:{port}"}
    if expect_continue:
        headers["Expect"] = "100-continue"
    reader, writer = await asyncio.open_connection(host, int(port))
    head = f"PATCH {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(head.encode() + b"\r\n")
    await writer.drain()
    if expect_continue:
        assert await reader.readexactly(len(CONTINUE)) == CONTINUE
    writer.write(b"abc")
    await writer.drain()
    status = await reader.readline()
    writer.close()
    await writer.wait_closed()
    assert b" 204 " in status

    def patch_lines() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "aiohttp.access" and r.getMessage().startswith("PATCH ")
        ]

    async def logged() -> bool:  # the line is written just after the answer is sent
        return bool(patch_lines())

    await wait_until(logged)
    line = patch_lines()[-1]
    caplog.clear()
    return int(line.split(" out=")[1].split()[0])


async def test_the_interim_100_continue_is_not_counted_as_response_bytes(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    plain = await _patch_logged_bytes_out(server, caplog, expect_continue=False)
    with_continue = await _patch_logged_bytes_out(server, caplog, expect_continue=True)
    assert plain > 0
    assert with_continue == plain


async def test_send_interim_writes_a_1xx_before_the_answer_and_counts_none_of_it() -> None:
    counted: list[int] = []

    async def answer(request: web.Request) -> web.Response:
        await send_interim(request, 104, {"Location": "/files/x", "Upload-Limit": "max-age=5"})
        counted.append(request.writer.output_size)
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port = runner.addresses[0][1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        interim = await reader.readuntil(b"\r\n\r\n")
        final = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    finally:
        await runner.cleanup()
    assert interim == (
        b"HTTP/1.1 104 Upload Resumption Supported\r\n"
        b"Location: /files/x\r\nUpload-Limit: max-age=5\r\n\r\n"
    )
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    assert counted == [0]


async def test_send_interim_refuses_what_is_not_one_interim_answer() -> None:
    request = make_mocked_request("POST", "/")
    with pytest.raises(ValueError, match="1xx"):
        await send_interim(request, 200, {})
    with pytest.raises(ValueError, match="one line"):
        await send_interim(request, 104, {"Location": "a\r\nSet-Cookie: x"})


async def _serve_taker(reads_first: int, *, give_back: bool = False) -> tuple[web.AppRunner, int]:
    """A bare app on the guarded runner whose POST handler reads `reads_first` bytes of the
    body through aiohttp, then takes the rest (`take_body`) and reads it from the socket
    (and with `give_back`, hands the connection back); it answers what it got: `none` when
    there was nothing to take, else the bytes' length and SHA-256, and how many had been
    buffered."""

    async def handler(request: web.Request) -> web.Response:
        if reads_first:
            await request.content.readexactly(reads_first)
        taken = take_body(request)
        if taken is None:
            return web.Response(text="none")
        received = bytearray(b"".join(taken.buffered))
        buffered = len(received)
        poller = select.poll()
        poller.register(taken.fd, select.POLLIN)
        try:
            while len(received) < buffered + taken.remaining:
                await asyncio.to_thread(poller.poll, 1000)
                with contextlib.suppress(BlockingIOError):
                    received += os.read(taken.fd, buffered + taken.remaining - len(received))
        finally:
            os.close(taken.fd)
        if give_back:
            taken.give_back()
        digest = hashlib.sha256(received).hexdigest()
        return web.Response(text=f"{len(received)} {digest} {buffered}")

    app = web.Application()
    app.router.add_post("/", handler)
    app.on_response_prepare.append(close_after_taken_body)
    limits = ConnectionLimits(max_header_bytes=8192, header_timeout_s=5, max_connections=10)
    runner = GuardedAppRunner(app, limits=limits)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_take_body_hands_over_the_buffered_bytes_and_the_socket_then_closes() -> None:
    runner, port = await _serve_taker(reads_first=0)
    body = os.urandom(3 * 2**20)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        # the head and a first part in one write: aiohttp has buffered some when it is taken
        writer.write(head.encode() + body[:100_000])
        await writer.drain()
        writer.write(body[100_000:])
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # until the server closes
        writer.close()
    finally:
        await runner.cleanup()
    head_part, _, text = answer.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 200"), answer
    assert b"Connection: close" in head_part
    size, digest, buffered = text.decode().split()
    assert (int(size), digest) == (len(body), hashlib.sha256(body).hexdigest())
    assert 0 < int(buffered) < len(body)  # some came through aiohttp, the rest not


async def test_take_body_takes_nothing_from_a_body_a_reader_has_begun() -> None:
    runner, port = await _serve_taker(reads_first=10)
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"http://127.0.0.1:{port}/", data=b"x" * 50) as response:
                assert await response.text() == "none"
                assert "Connection" not in response.headers
    finally:
        await runner.cleanup()


async def test_a_connection_given_back_parses_the_request_after_the_taken_body() -> None:
    runner, port = await _serve_taker(reads_first=0, give_back=True)
    body = os.urandom(2**20)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        writer.write(head + body + head + body)  # two requests back to back
        await writer.drain()
        answers = []
        for _ in range(2):
            status = await asyncio.wait_for(reader.readline(), 10)
            headers = {}
            while line := (await reader.readline()).strip():
                name, _, value = line.decode().partition(":")
                headers[name.lower()] = value.strip()
            text = await reader.readexactly(int(headers["content-length"]))
            answers.append((status, headers, text.decode().split()))
        writer.close()
    finally:
        await runner.cleanup()
    expected = [str(len(body)), hashlib.sha256(body).hexdigest()]
    for status, headers, (size, digest, _buffered) in answers:
        assert status.startswith(b"HTTP/1.1 200"), status
        assert "connection" not in headers  # kept open for the next request
        assert [size, digest] == expected
