"""HTTP/1.1 over a plain socket, for what a high-level client hides: the test decides every
byte of a body, when (or whether) the connection closes, and can see (Linux: /proc/net/tcp)
whether the server has read what was sent."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tests.support.tus import patch_headers

TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"


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
    async def connect(cls, url: str) -> RawRequest:
        """A connection to the server of `url` on which nothing is sent yet: the test sends
        every byte itself (`send`), malformed ones included."""
        parts = urlsplit(url)
        assert parts.hostname is not None and parts.port is not None
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer)

    @classmethod
    async def patch(cls, url: str, offset: int, content_length: int) -> RawRequest:
        headers = {**patch_headers(offset), "Content-Length": str(content_length)}
        return await cls.start(url, "PATCH", headers)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()
        self.sent += len(data)

    async def response(self, timeout_s: float = 10.0, *, has_body: bool = True) -> RawResponse:
        """Read the answer (status line, headers, Content-Length body; no body when
        `has_body` is False, as for the answer to a HEAD)."""
        async with asyncio.timeout(timeout_s):
            status_line = await self.reader.readline()
            if not status_line:
                raise ConnectionResetError("the server closed the connection without answering")
            status = int(status_line.split()[1])
            headers: dict[str, str] = {}
            while line := (await self.reader.readline()).rstrip(b"\r\n"):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            size = int(headers.get("content-length", "0")) if has_body else 0
            body = await self.reader.readexactly(size)
        self.answered = True
        return RawResponse(status, headers, body)

    async def rest_until_closed(self, timeout_s: float = 10.0) -> bytes:
        """Every byte the server sends until it closes the connection (a reset counts as a
        close); TimeoutError if it keeps the connection open past `timeout_s`."""
        received = b""
        async with asyncio.timeout(timeout_s):
            try:
                while chunk := await self.reader.read(65536):
                    received += chunk
            except ConnectionError:  # reset, or a write that met the close
                pass
        return received

    def is_read_by_server(self) -> bool:
        """Whether the server process has read every byte sent so far: none is left in this
        side's buffers or unacknowledged, none waits unread in the server's receive queue.
        (Linux only: the queues are read from /proc/net/tcp.)"""
        if self.writer.transport.get_write_buffer_size():
            return False
        client_port = int(self.writer.get_extra_info("sockname")[1])
        server_port = int(self.writer.get_extra_info("peername")[1])
        # this side first: once nothing is unacknowledged, every byte is in the server's queue
        if _connection(client_port, server_port).send_queue:
            return False
        return _connection(server_port, client_port).receive_queue == 0

    def is_read_or_closed_by_server(self) -> bool:
        """Whether the server has read every byte sent so far, or has closed its side of the
        connection (it reads no more); from one look at the kernel's sockets, so a close
        between two looks cannot go unseen. (Linux only, as is_read_by_server.)"""
        client_port = int(self.writer.get_extra_info("sockname")[1])
        server_port = int(self.writer.get_extra_info("peername")[1])
        established = {
            (socket.local_port, socket.remote_port): socket
            for socket in tcp_sockets()
            if socket.state == TCP_ESTABLISHED
        }
        server_side = established.get((server_port, client_port))
        if server_side is None:
            return True
        client_side = established.get((client_port, server_port))
        if self.writer.transport.get_write_buffer_size() or client_side is None:
            return False
        return client_side.send_queue == 0 and server_side.receive_queue == 0

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


def authority_of(url: str) -> str:
    """The host and port of `url`, as a Host header names them."""
    return urlsplit(url).netloc


def request_bytes(
    method: str,
    target: str | bytes,
    headers: Iterable[tuple[str | bytes, str | bytes]],
    body: bytes = b"",
) -> bytes:
    """One HTTP/1.1 request exactly as given: the header lines in order, repeats kept, text as
    UTF-8 and bytes as they are; nothing is added (not even Host or Content-Length)."""

    def raw(text: str | bytes) -> bytes:
        return text if isinstance(text, bytes) else text.encode()

    lines = [raw(method) + b" " + raw(target) + b" HTTP/1.1"]
    lines += [raw(name) + b": " + raw(value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def exchange(
    url: str, data: bytes, *, timeout_s: float = 10.0, has_body: bool = True
) -> RawResponse:
    """Send `data` (one or more requests, as bytes) on a new connection to the server of `url`;
    its first answer (ConnectionResetError if it closes the connection without one)."""
    request = await RawRequest.connect(url)
    try:
        await request.send(data)
        return await request.response(timeout_s, has_body=has_body)
    finally:
        await request.close()


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


async def send_until_answered(
    request: RawRequest, data: bytes, *, chunk: int = 256 * 1024, pause_s: float = 0.0
) -> RawResponse | None:
    """Send `data` until the server answers or closes; its answer (None if it closed the
    connection without one)."""
    answer = asyncio.create_task(request.response(timeout_s=30))
    sender = asyncio.create_task(stream_paced(request, data, chunk=chunk, pause_s=pause_s))
    await asyncio.wait({answer, sender}, return_when=asyncio.FIRST_COMPLETED)
    sender.cancel()  # the server answered: it reads no more
    # OSError: the server answered and closed while we were still sending
    await asyncio.gather(sender, return_exceptions=True)
    try:
        return await answer
    except (OSError, asyncio.IncompleteReadError):
        return None


# -- the kernel's view of TCP sockets on this machine (Linux) ------------------------------


@dataclass(frozen=True)
class TcpSocket:
    """One IPv4 TCP socket, as a line of /proc/net/tcp shows it."""

    local_port: int
    remote_port: int
    state: str  # TCP_LISTEN, TCP_ESTABLISHED, ...
    send_queue: int  # bytes not yet acknowledged by the peer
    receive_queue: int  # bytes received, not yet read by the process
    inode: int


def tcp_sockets() -> list[TcpSocket]:
    """Every IPv4 TCP socket of this network namespace."""
    sockets = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        send_queue, receive_queue = (int(queue, 16) for queue in fields[4].split(":"))
        sockets.append(
            TcpSocket(
                local_port=int(fields[1].split(":")[1], 16),
                remote_port=int(fields[2].split(":")[1], 16),
                state=fields[3],
                send_queue=send_queue,
                receive_queue=receive_queue,
                inode=int(fields[9]),
            )
        )
    return sockets


def _connection(local_port: int, remote_port: int) -> TcpSocket:
    found = [
        socket
        for socket in tcp_sockets()
        if (socket.local_port, socket.remote_port, socket.state)
        == (local_port, remote_port, TCP_ESTABLISHED)
    ]
    assert len(found) == 1, f"connections from port {local_port} to {remote_port}: {found}"
    return found[0]
