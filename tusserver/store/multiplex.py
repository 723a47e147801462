"""One connection to a single Redis (or Valkey), shared by every request of a process, for
the short Lua steps of the upload path (create, acquire, read, commit, complete, release).

redis-py's pooled client spent more of a request's event-loop time than the step itself: a
connection taken from the pool and given back, its health check, a command packed in Python,
one send and one receive per step (benchmarks/README.md, "Redis steps in one write"). Here
the steps issued during one turn of the event loop are packed by hiredis into one write; the
replies, which Redis sends in the order it got the commands, are read as they come and handed
to their callers in that order. Nothing waits for a free connection: Redis runs the steps one
after another, as it does anyway.

A step fails with redis-py's exceptions, so callers handle it as before: a reply that is not
there after `timeout_s`, or a connection that drops, fails every step still waiting on it
(TimeoutError, ConnectionError: their effect is unknown, as on any connection), and the next
step connects anew. Nothing is retried here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections import deque
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError, NoScriptError, TimeoutError

from tusserver.tasks import cancel_and_wait

Key = str | bytes
Arg = str | bytes | int | float
READ_BYTES = 256 * 1024
_INCOMPLETE = object()  # hiredis's answer while a reply has not fully arrived


def _error_of(reply: hiredis.ReplyError) -> Exception:
    """The redis-py exception for an error reply (NOSCRIPT, READONLY, OOM, LOADING...)."""
    error: Exception = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return error


class _Link:
    """One open connection: the steps sent on it and not yet answered, oldest first."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout_s: float
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.writer = writer
        self.timeout_s = timeout_s
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self.outgoing: list[bytes] = []
        self.flushing: asyncio.Handle | None = None
        self.closed = False
        self.parser = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self.reading = asyncio.create_task(self._read(reader))
        self.watching = self.loop.call_later(1.0, self._watch)

    def send(self, args: Sequence[Arg]) -> asyncio.Future[Any]:
        """Queue one command for this turn's write; its reply's future."""
        future: asyncio.Future[Any] = self.loop.create_future()
        self.waiting.append((future, self.loop.time()))
        self.outgoing.append(hiredis.pack_command(tuple(args)))  # type: ignore[arg-type]
        if self.flushing is None:
            self.flushing = self.loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self.flushing = None
        data = b"".join(self.outgoing)
        self.outgoing.clear()
        if not self.closed:
            self.writer.write(data)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(READ_BYTES)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                self.parser.feed(data)
                while (reply := self.parser.gets()) is not _INCOMPLETE:
                    if not self.waiting:
                        raise ConnectionError("Redis sent a reply nobody asked for")
                    future, _sent_at = self.waiting.popleft()
                    if future.done():  # its caller was cancelled
                        continue
                    if isinstance(reply, hiredis.ReplyError):
                        future.set_exception(_error_of(reply))
                    else:
                        future.set_result(reply)
        except ConnectionError as error:
            self.close(error)
        except Exception as error:  # OSError, hiredis.ProtocolError: the link is unusable
            self.close(ConnectionError(f"Redis connection lost: {error!r}"))

    def _watch(self) -> None:
        if self.closed:
            return
        if self.waiting and self.loop.time() - self.waiting[0][1] > self.timeout_s:
            self.close(TimeoutError(f"Redis did not answer within {self.timeout_s:g} s"))
            return
        self.watching = self.loop.call_later(1.0, self._watch)

    def close(self, error: Exception) -> None:
        """Fail every step still waiting with `error` and drop the connection."""
        if self.closed:
            return
        self.closed = True
        self.watching.cancel()
        if self.flushing is not None:
            self.flushing.cancel()
            self.flushing = None
        self.outgoing.clear()
        if asyncio.current_task() is not self.reading:
            self.reading.cancel()
        self.writer.close()
        while self.waiting:
            future, _sent_at = self.waiting.popleft()
            if not future.done():  # each its own exception: their tracebacks differ
                future.set_exception(type(error)(*error.args))


class Multiplexed:
    """Steps on one shared connection to the Redis that `pool` connects to (its address,
    TLS, credentials and database are used as they are; the pool itself is not)."""

    def __init__(self, pool: aioredis.ConnectionPool, timeout_s: float) -> None:
        self._pool = pool
        self.timeout_s = timeout_s
        self._link: _Link | None = None
        # The one attempt to connect that every step arriving meanwhile waits for: when Redis
        # is down they fail together, not one connect timeout after another.
        self._opening: asyncio.Task[_Link] | None = None

    async def execute(self, *args: Arg) -> Any:
        """One command's reply; a Redis error reply raises its redis-py exception."""
        link = self._link
        if link is None or link.closed:
            link = await self._connected()
        return await link.send(args)

    def register_script(self, text: str) -> MultiplexedScript:
        return MultiplexedScript(self, text)

    async def _connected(self) -> _Link:
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open_link())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    async def _open_link(self) -> _Link:
        reader, writer = await _open(self._pool)
        self._link = _Link(reader, writer, self.timeout_s)
        return self._link

    def _opened(self, opening: asyncio.Task[_Link]) -> None:
        self._opening = None
        if not opening.cancelled():
            opening.exception()  # retrieved: each waiting step has raised it already

    async def aclose(self) -> None:
        if self._opening is not None:
            await cancel_and_wait(self._opening)
        link, self._link = self._link, None
        if link is not None:
            link.close(ConnectionError("the Redis connection was closed"))
            with contextlib.suppress(asyncio.CancelledError):
                await link.reading
            with contextlib.suppress(OSError):
                await link.writer.wait_closed()


async def _open(pool: aioredis.ConnectionPool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection made and greeted (TLS, AUTH, SELECT) as redis-py makes one for `pool`,
    whose streams are then taken over: redis-py never reads or writes them again."""
    connection = pool.make_connection()  # type: ignore[no-untyped-call]
    await connection.connect()
    reader, writer = connection._reader, connection._writer
    if reader is None or writer is None:  # pragma: no cover - connect() sets both or raises
        raise ConnectionError("redis-py did not open a connection")
    connection._reader = connection._writer = None  # so it never closes ours
    return reader, writer


class Step(Protocol):
    """A registered Lua script, called as redis-py's are: redis-py's own, or a
    `MultiplexedScript`."""

    def __call__(
        self, keys: Sequence[Key] | None = None, args: Iterable[Arg] | None = None
    ) -> Awaitable[Any]: ...


class MultiplexedScript:
    """A Lua script run by its SHA-1 on a `Multiplexed`, called as redis-py's scripts are;
    a Redis that does not know it yet (a restart, a failover) is sent its text once."""

    def __init__(self, steps: Multiplexed, text: str) -> None:
        self.steps = steps
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()  # its name

    async def __call__(
        self, keys: Sequence[Key] | None = None, args: Iterable[Arg] | None = None
    ) -> Any:
        keys = keys or ()
        values = (len(keys), *keys, *(args or ()))
        try:
            return await self.steps.execute("EVALSHA", self.sha, *values)
        except NoScriptError:
            return await self.steps.execute("EVAL", self.text, *values)
