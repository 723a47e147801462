"""Every use of aiohttp's private details, in one module.

aiohttp has no public way to take the bytes a failed body stream still buffers, to clear an
error set on that stream, to keep an interim `100 Continue` out of the response's byte
count, or to bound what a connection may cost before its request is known (the total size
of a header block, the time it takes to arrive, the number of open connections), nor to
feed a `StreamReader` of our own with flow control (a form's file part), nor to take the
rest of a body away from its parser and read it from the socket (a large upload body). These
functions and classes do it through private fields and methods; `tests/test_aiohttp_private.py`
fails the day an aiohttp upgrade renames or changes them, instead of the server quietly
losing bytes, miscounting or letting strangers pin memory.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import StreamReader, web, web_protocol
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpRequestParser  # what web_protocol uses (C, else Python)
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
MAX_LOGGED_REASON_CHARS = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def unread_chunks(body: StreamReader) -> list[bytes]:
    """Take the bytes the stream received but had not handed out when it failed. `readany`
    raises a stored error (the client hung up, or an error we set to wake the reader) before
    returning its buffer, yet those bytes did arrive, in order, after what was read."""
    # One chunk at a time, as `readany` takes them, so the stream's byte count and flow
    # control stay right; only the chunks buffered now (taking one may resume reading).
    return [body._read_nowait_chunk(-1) for _ in range(len(body._buffer))]


def clear_error(body: StreamReader) -> None:
    """Forget the error set on the stream (`set_exception`), so aiohttp drains the rest of the
    body after the answer instead of logging our own wake-up signal as unhandled."""
    body._exception = None


class _FeederFlow(BaseProtocol):
    """The flow control of a stream we feed ourselves: the stream pauses its feeder past its
    high-water mark and resumes it below its low-water mark, as it would a connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.may_feed = asyncio.Event()
        self.may_feed.set()

    @property
    def connected(self) -> bool:
        """Always: a reader that waits must not be told "Connection closed"; the feeder ends
        the stream itself (its end, or an error)."""
        return True

    def pause_reading(self) -> None:
        self.may_feed.clear()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self.may_feed.set()


class FedStream:
    """A `StreamReader` fed by our own code rather than a connection (the upload service
    reads a `StreamReader`): `feed` waits while the stream holds more than twice `limit`
    bytes unread, so what it buffers stays bounded whatever the feeder's source."""

    def __init__(self, limit: int) -> None:
        loop = asyncio.get_running_loop()
        self._flow = _FeederFlow(loop)
        self.stream = StreamReader(self._flow, limit, loop=loop)

    async def feed(self, chunk: bytes) -> None:
        """Hand `chunk` to the reader once the stream has room for it."""
        await self._flow.may_feed.wait()
        self.stream.feed_data(chunk)

    def end(self, error: BaseException | None = None) -> None:
        """The feeder is done: the end of the stream, or `error` for its reader."""
        if error is None:
            self.stream.feed_eof()
        elif self.stream.exception() is None:
            self.stream.set_exception(error)


async def send_continue(request: web.BaseRequest) -> None:
    """Send `100 Continue` now (after the checks a refusal would come from) if the request
    asked for it (`Expect: 100-continue`; any other expectation was answered 417 before it
    got here). The interim answer is not part of the response: its bytes are taken off the
    writer's count, as aiohttp's own expect handler does, so the access log's `bytes_out`
    stays the answer's."""
    if request.headers.get("Expect", "").strip().lower() != "100-continue":
        return
    writer = request.writer
    await writer.write(CONTINUE)
    writer.output_size = 0


INTERIM_REASONS = {100: "Continue", 103: "Early Hints", 104: "Upload Resumption Supported"}


async def send_interim(request: web.BaseRequest, status: int, headers: Mapping[str, str]) -> None:
    """Send an interim (1xx) response with `headers` now, kept out of the response's byte
    count as `send_continue` does (aiohttp has no public way to send one)."""
    if not 100 <= status < 200:
        raise ValueError("an interim response has a 1xx status")
    lines = [f"HTTP/1.1 {status} {INTERIM_REASONS.get(status, 'Informational')}"]
    for name, value in headers.items():
        if any(char in name + value for char in "\r\n"):
            raise ValueError("a header of an interim response must be one line")
        lines.append(f"{name}: {value}")
    writer = request.writer
    await writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    writer.output_size = 0


BODY_TAKEN = web.RequestKey("body_taken", bool)  # the body was read off aiohttp's parser


@dataclass(frozen=True)
class TakenBody:
    """A request body's connection, taken from aiohttp to be read elsewhere (`take_body`)."""

    fd: int  # a duplicate of the connection's socket (non-blocking), the taker's to close
    buffered: list[bytes]  # what aiohttp had already received of the body, in order
    remaining: int  # the bytes of the body still to come on the socket
    # Called once the taker has read exactly `remaining` bytes: the connection serves the
    # next request (else the answer closes it).
    give_back: Callable[[], None]


def take_body(request: web.BaseRequest) -> TakenBody | None:
    """Take the rest of the request's body away from aiohttp, to be read straight from the
    socket: reading from the connection stops and aiohttp sees the body as ended. Once the
    taker has read the body to its end, `give_back` lets the connection serve its next
    request (with a fresh parser: the old one still counts the body's bytes as to come);
    otherwise the answer closes the connection. None, leaving everything as it was, unless
    the body has a Content-Length, none of it was read yet, and the connection is plain TCP
    or a Unix socket (TLS bytes are not the body)."""
    handler, transport, payload = request.protocol, request.transport, request.content
    length = request.content_length
    if not isinstance(handler, GuardedRequestHandler) or transport is None or length is None:
        return None
    if transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or payload.is_eof() or payload.exception() is not None:
        return None
    if handler._upgraded or handler._messages:
        return None
    unread = sum(len(chunk) for chunk in payload._buffer)
    if unread != payload.total_bytes or payload.total_bytes > length:
        return None  # a reader has taken some of it already
    try:
        fd = os.dup(sock.fileno())
    except OSError:  # out of descriptors: read it on the loop
        return None
    handler.stop_reading_for_taker()
    buffered = unread_chunks(payload)
    payload.feed_eof()
    request[BODY_TAKEN] = True

    def give_back() -> None:
        request[BODY_TAKEN] = False
        handler.read_again_after_taker()

    return TakenBody(fd, buffered, length - payload.total_bytes, give_back)


async def close_after_taken_body(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the answer to a request whose body was taken closes the
    connection (`take_body`)."""
    if request.get(BODY_TAKEN):
        response.force_close()  # aiohttp closes the connection after the answer
        response.headers["Connection"] = "close"  # the headers were made before this hook


@dataclass(frozen=True)
class ConnectionLimits:
    """What one connection may cost before its request is known."""

    max_header_bytes: int  # a header block past this is answered 431 and closed
    header_timeout_s: float  # a header block not complete by then is answered 408 and closed
    max_connections: int  # connections past this many open in the process are closed at once
    # told +1 when a connection opens and -1 when it closes (the metrics' open connections)
    count_connection: Callable[[int], None] | None = None


def _plain_answer(status: int, reason: str, text: str) -> bytes:
    body = text.encode() + b"\n"
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _head_size(message: object) -> int:
    """The bytes of a parsed request's header block (request line, header lines and the empty
    line that ends them); 0 for what the parser handed on as an error."""
    if not isinstance(message, RawRequestMessage):
        return 0
    line = len(message.method) + len(message.path) + len("  HTTP/1.1\r\n")
    fields = sum(len(name) + len(value) + len(": \r\n") for name, value in message.raw_headers)
    return line + fields + len("\r\n")


def _message_bytes(message: object) -> int | None:
    """The bytes of a parsed request (its header block and body), None when a chunked body
    makes them unknown."""
    if not isinstance(message, RawRequestMessage):
        return 0
    if message.chunked:
        return None
    length = message.headers.get("Content-Length", "")
    return _head_size(message) + (int(length) if length.isdigit() else 0)


def _refusal(status: int, reason: str) -> tuple[web_protocol._ErrInfo, StreamReader]:
    """A parsed request replaced by the answer `status`: start() answers it as it answers the
    parser's own errors (and closes the connection)."""
    error = HttpProcessingError(code=status, message=reason)
    return web_protocol._ErrInfo(status, error, reason), EMPTY_PAYLOAD


def _refused_or_kept(
    message: tuple[Any, StreamReader], limits: ConnectionLimits
) -> tuple[Any, StreamReader]:
    """A request as parsed, or the refusal to answer it with: 431 for a header block over the
    limit, 417 for an `Expect` other than `100-continue` (answered here, for every route, so
    no handler ever sees a value it cannot encode)."""
    parsed, _payload = message
    if not isinstance(parsed, RawRequestMessage):
        return message
    if _head_size(parsed) > limits.max_header_bytes:
        return _refusal(431, f"the request's headers are over {limits.max_header_bytes} bytes")
    expect = parsed.headers.get("Expect")
    if expect is not None and expect.strip().lower() != "100-continue":
        return _refusal(417, "only Expect: 100-continue is understood")
    return message


class GuardedRequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, with the limits of `ConnectionLimits` on the bytes and
    the time a header block may take, and with ordinary parse errors (a malformed request is
    an everyday sight on the internet) logged in one line instead of a traceback."""

    def __init__(self, manager: web.Server, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._auto_decompress = bool(kwargs.get("auto_decompress", True))  # for a new parser
        self._limits = limits
        self._head_bytes = 0  # bytes of the header block being received
        self._head_timer: asyncio.TimerHandle | None = None
        self._last_payload: StreamReader | None = None  # the body of the last request
        self._body_taken = False  # a handler reads the body from the socket (`take_body`)

    def stop_reading_for_taker(self) -> None:
        """Stop reading the connection: its body is read by someone else now."""
        self._body_taken = True
        self._pause_transport_reading()

    def read_again_after_taker(self) -> None:
        """The taker read the body to its end: parse what follows with a fresh parser (the
        old one still counts the body's bytes as to come), as aiohttp made the first."""
        self._parser = HttpRequestParser(
            self, self._loop, self._read_bufsize, max_line_size=self.max_line_size,
            max_field_size=self.max_field_size, max_headers=self.max_headers,
            payload_exception=web_protocol.RequestPayloadError,
            auto_decompress=self._auto_decompress,
            max_msg_queue_size=web_protocol.MAX_MSG_QUEUE_SIZE,
        )  # fmt: skip
        self._body_taken = False
        self._resume_transport_reading()

    def _resume_transport_reading(self) -> None:
        if not self._body_taken:
            super()._resume_transport_reading()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._limits.count_connection is not None:
            self._limits.count_connection(1)
        manager = self._manager  # its private dict: the `connections` property copies it
        if manager is not None and len(manager._connections) > self._limits.max_connections:
            self._answer_and_close(503, "Service Unavailable", "too many open connections")
            return
        self._start_head_timer()  # a connection that never sends its request is closed

    def data_received(self, data: bytes) -> None:
        if self._body_taken:
            return
        payload = self._last_payload
        is_awaiting_head = payload is None or payload.is_eof()
        if is_awaiting_head and self._head_timer is None:
            self._start_head_timer()
        head_bytes_before = self._head_bytes if is_awaiting_head else None
        requests_before = self._request_count
        super().data_received(data)
        completed = self._request_count - requests_before
        if completed == 0:
            if is_awaiting_head:
                self._count_head_bytes(len(data))
            return
        # Header blocks were completed; start() has not taken them yet, so they may still be
        # answered in another way.
        new = list(self._messages)[-completed:]
        for _ in new:
            self._messages.pop()
        self._messages.extend(_refused_or_kept(message, self._limits) for message in new)
        self._stop_head_timer()
        self._head_bytes = 0
        self._last_payload = new[-1][1]
        if head_bytes_before is not None and self._last_payload.is_eof():
            # The rest of this read, if any, is the start of the next (pipelined) block.
            sizes = [_message_bytes(message) for message, _ in new]
            known = [size for size in sizes if size is not None]
            rest = len(data) + head_bytes_before - sum(known)
            if rest > 0 and len(known) == len(sizes):
                self._start_head_timer()
                self._count_head_bytes(rest)

    def _count_head_bytes(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._limits.max_header_bytes:
            self._refuse_large_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._limits.count_connection is not None:
            self._limits.count_connection(-1)
        self._stop_head_timer()
        super().connection_lost(exc)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        error = kw.get("exc_info")
        if isinstance(error, HttpProcessingError):
            # aiohttp's message may quote the request over several lines (a caret under the
            # bad byte): one line, bounded, and with control characters escaped
            text = " ".join(str(error.message or error).split())[:MAX_LOGGED_REASON_CHARS]
            text = _CONTROL.sub("?", text).encode("ascii", "backslashreplace").decode()
            self.logger.info("refused a malformed request: %s", text)
            return
        super().log_exception(*args, **kw)

    def _refuse_large_head(self) -> None:
        limit = self._limits.max_header_bytes
        self._answer_and_close(
            431, "Request Header Fields Too Large", f"the request's headers are over {limit} bytes"
        )

    def _start_head_timer(self) -> None:
        self._stop_head_timer()
        self._head_timer = self._loop.call_later(self._limits.header_timeout_s, self._head_late)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        payload = self._last_payload
        if payload is not None and not payload.is_eof():
            return  # a request is being read: its body has its own stall timeout
        if self._head_bytes == 0 and self._request_count > 0:
            return  # idle between requests: the keep-alive timeout governs
        seconds = self._limits.header_timeout_s
        self._answer_and_close(
            408, "Request Timeout", f"the request's headers took longer than {seconds:g} s"
        )

    def _answer_and_close(self, status: int, reason: str, text: str) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(_plain_answer(status, reason, text))
        self.force_close()


class GuardedServer(web.Server):
    """aiohttp's connection factory, making `GuardedRequestHandler`s."""

    def __init__(self, inner: web.Server, limits: ConnectionLimits) -> None:
        super().__init__(
            inner.request_handler,
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            loop=inner._loop,
            **inner._kwargs,
        )
        self.limits = limits

    def __call__(self) -> web_protocol.RequestHandler:
        return GuardedRequestHandler(self, limits=self.limits, loop=self._loop, **self._kwargs)


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections keep `ConnectionLimits`."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.limits)
