"""Making the embedded Valkey's AOF durable from this process, only for the steps that need it
(docs/architecture.md, "What must reach the disk").

Under `appendfsync always` Valkey fsyncs its AOF in its only thread, and every client's answer
waits for that fsync, on the disk that also takes the uploads' writeback: a resuming client's
HEAD waited behind the creations and completions of everyone else. So the embedded Valkey runs
`appendfsync no` (under `--fsync always` and `complete`), and this process syncs the AOF's
files itself, from a thread of its own:

- Valkey writes each turn's AOF records with write(2) before it sends that turn's replies, so
  once a reply has arrived its records are in the file (the page cache), unless that write
  failed: then Valkey keeps the records to write again, reports `aof_last_write_status:err`
  and refuses writes until one succeeds.
- `durable()` returns once every record written before it was called is on the disk: a round
  first asks Valkey that its last AOF write succeeded (INFO), then fdatasyncs each incremental
  AOF file that changed since the last round. One round serves every step waiting when it
  begins (a group commit); a step that arrives during a round waits for the next.
- A step that made a promise to a client (a creation, a completion, a removal; state.py and
  batches.py) awaits `durable()` before the client is answered. The other AOF writes (offset
  checkpoints, delivery steps of webhooks) reach the disk at the next round, which
  `keep_up()` runs every second when nothing else did.

After a failed fdatasync the kernel may have dropped the pages it could not write, and a later
fdatasync of the same file need not report it again, so every later `durable()` fails too
(503) and the readiness check says so: the process must be restarted, and Valkey, started
again, rewrites what it has in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tusserver.errors import ServiceUnavailable
from tusserver.store.client import RedisClient
from tusserver.tasks import cancel_and_wait

log = logging.getLogger(__name__)

ROUND_EVERY_S = 1.0  # keep_up(): the longest an AOF record waits for the disk when none asks

# What the steps that promise something to a client await before it is answered: once it
# returns, what Redis wrote so far is on disk (state.py, batches.py).
Durable = Callable[[], Awaitable[None]]


async def already_durable() -> None:
    """The Durable of a Redis that fsyncs its own writes (an external one, or `--fsync never`,
    which promises less)."""


@dataclass
class _AofFile:
    fd: int
    inode: int
    synced: tuple[int, int] = (-1, -1)  # (size, mtime in ns) when last synced


class AofSync:
    """Group-committed fdatasyncs of the AOF in `directory` (the embedded Valkey's
    `appendonlydir`), whose last write `redis` reports."""

    def __init__(self, directory: Path, redis: RedisClient) -> None:
        self.directory = directory
        self._redis = redis
        self._files: dict[str, _AofFile] = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tus-aofsync")
        self._waiting: list[asyncio.Future[None]] = []
        self._rounds: asyncio.Task[None] | None = None
        self.failure = ""  # why the AOF can no longer be made durable; "" while it can
        self.rounds = 0  # rounds run (each one INFO and the fdatasyncs it needed)

    async def durable(self) -> None:
        """Return once every AOF record Valkey wrote before this call is on the disk; raises
        ServiceUnavailable when that cannot be known or done."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        if self._rounds is None:
            self._rounds = asyncio.create_task(self._run_rounds())
        await waiter

    async def keep_up(self, every_s: float = ROUND_EVERY_S) -> None:
        """Run a round every `every_s` (until cancelled), so that records no step waited for
        reach the disk within about that."""
        while True:
            await asyncio.sleep(every_s)
            with contextlib.suppress(ServiceUnavailable):
                await self.durable()

    async def _run_rounds(self) -> None:
        waiters: list[asyncio.Future[None]] = []
        try:
            while self._waiting:
                waiters, self._waiting = self._waiting, []
                try:
                    await self._round()
                except ServiceUnavailable as error:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(ServiceUnavailable(str(error)))
                    continue
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            self._rounds = None
            for waiter in waiters + self._waiting:  # cancelled (close): none may hang
                waiter.cancel()
            self._waiting.clear()

    async def _round(self) -> None:
        if self.failure:
            raise ServiceUnavailable(self.failure)
        try:
            info = await self._redis.info("persistence")
        except Exception as error:  # any failure to answer: we cannot know what was written
            raise ServiceUnavailable(f"Redis unreachable: {error}") from None
        if info.get("aof_last_write_status") != "ok":
            raise ServiceUnavailable("the embedded Valkey cannot write its AOF (disk full?)")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._thread, self._sync_files)
        except OSError as error:
            self.failure = f"the embedded Valkey's AOF could not be synced ({error}): restart"
            log.error("%s", self.failure)
            raise ServiceUnavailable(self.failure) from None
        self.rounds += 1

    def _sync_files(self) -> None:
        """In the sync thread: fdatasync each incremental AOF file that changed since it was
        last synced. Valkey appends to one at a time; a rewrite starts another, and the old
        ones stay listed (and in this directory) until the rewrite's base, fsynced by Valkey,
        holds their records."""
        with os.scandir(self.directory) as entries:
            names = {entry.name for entry in entries if ".incr" in entry.name}
        for name in set(self._files) - names:
            os.close(self._files.pop(name).fd)
        for name in sorted(names):
            try:
                aof = self._file(name)
            except FileNotFoundError:  # gone since the listing: a rewrite ended meanwhile
                continue
            status = os.fstat(aof.fd)
            stamp = (status.st_size, status.st_mtime_ns)
            if stamp != aof.synced:
                os.fdatasync(aof.fd)
                aof.synced = stamp

    def _file(self, name: str) -> _AofFile:
        """The open file `name`, opened again when the name now means another file."""
        path = self.directory / name
        known = self._files.get(name)
        if known is not None and os.stat(path).st_ino == known.inode:
            return known
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        if known is not None:
            os.close(known.fd)
        opened = _AofFile(fd, os.fstat(fd).st_ino)
        self._files[name] = opened
        return opened

    async def close(self) -> None:
        """Stop the rounds and close the files."""
        if self._rounds is not None:
            await cancel_and_wait(self._rounds)
        self._thread.shutdown(wait=True)
        for aof in self._files.values():
            os.close(aof.fd)
        self._files.clear()


@contextlib.asynccontextmanager
async def kept_up(directory: Path | None, redis: RedisClient) -> AsyncIterator[AofSync | None]:
    """The AofSync of the AOF in `directory`, its rounds kept up every second, closed after;
    None (nothing to sync) when `directory` is None."""
    if directory is None:
        yield None
        return
    aof = AofSync(directory, redis)
    keeping_up = asyncio.create_task(aof.keep_up())
    try:
        yield aof
    finally:
        await cancel_and_wait(keeping_up)
        await aof.close()
