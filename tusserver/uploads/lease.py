"""Upload locks held by this process: taking one (asking a running holder to let go), keeping
it renewed, and passing requests from other requests to whoever holds it.

A `Lease` knows nothing of its holder: the holder hands it two callbacks, one to wake its
reader (another request takes over, the lock is lost, the server stops) and one to commit
now (a HEAD wants the current offset). `Leases` takes, holds and releases them, and renews
every lock the process holds in one Redis round trip per tick, so thousands of open uploads
cost one call every 100 ms rather than one each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from tusserver.errors import ServiceUnavailable, UploadLocked
from tusserver.store.records import Upload, shard_of
from tusserver.store.state import LockLost, UploadState
from tusserver.tasks import cancel_and_wait, was_cancelled
from tusserver.uploads.body import ShuttingDown, TakenOver

log = logging.getLogger("tusserver.uploads")

LOCK_TTL_MS = 3000
# Renewals extend the lock only when less than this is left: one write every ~0.5 s instead
# of every 100 ms (fewer writes for Redis's one thread), while the lock keeps at least 2.4 s
# in hand.
LOCK_EXTEND_BELOW_MS = 2500
RENEW_INTERVAL_S = 0.1  # how often requests to holders are looked for (in shards asked)
RENEW_ALL_S = 0.5  # how often every lock is renewed (and extended, below the mark above)
TAKEOVER_WAIT_S = 1.0
POLL_S = 0.02

WakeReader = Callable[[Exception], None]
CommitNow = Callable[[str], Awaitable[object]]
# Told of contention (the metrics listen): "takeover" when a running holder was asked to stop
# and the lock passed on, and a wait's result, "acquired" or "locked" (423).
CountLock = Callable[[str], None]


def _nobody_reading(_error: Exception) -> None:
    return None


def _uncounted(_result: str) -> None:
    return None


class Lease:
    """A held upload lock, renewed in the background until released."""

    def __init__(self, upload_id: str, token: str) -> None:
        self.upload_id = upload_id
        self.shard = shard_of(upload_id)
        self.token = token
        self.stop_requested = False
        self.lost = False
        self.released = False
        self.renewed_at = time.monotonic()
        self._wake_reader: WakeReader = _nobody_reading
        self._commit_now: CommitNow | None = None

    def listen(self, *, wake_reader: WakeReader, commit_now: CommitNow | None = None) -> None:
        """The holder's callbacks: `wake_reader(error)` stops its body read, `commit_now(ack)`
        commits what it wrote and acknowledges `ack`."""
        self._wake_reader = wake_reader
        self._commit_now = commit_now

    def wake(self, error: Exception) -> None:
        """Stop the holder's body read with `error` (TakenOver, LockLost, ShuttingDown)."""
        self._wake_reader(error)

    def lose(self) -> None:
        """The lock is not ours any more: stop the holder's read."""
        self.lost = True
        self.wake(LockLost())

    def answer(self, request: str) -> Awaitable[object] | None:
        """Act on a request from another request: `stop` wakes the reader; `commit:<nonce>`
        gives the commit to run (acknowledging the nonce), if the holder takes such requests."""
        if request == "stop":
            self.stop_requested = True
            self.wake(TakenOver())
        elif request.startswith("commit:") and self._commit_now is not None:
            return self._commit_now(request.removeprefix("commit:"))
        return None


class Leases:
    """The locks this process holds, so a graceful stop can wake every holder."""

    def __init__(self, state: UploadState, count_lock: CountLock = _uncounted) -> None:
        self.state = state
        self.count_lock = count_lock
        self._held: set[Lease] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._commits: set[asyncio.Task[None]] = set()
        self.is_stopping = False

    def refuse_if_stopping(self) -> None:
        """503 once the server is stopping: no new lock, no new upload."""
        if self.is_stopping:
            raise ServiceUnavailable("the server is restarting; retry shortly", 2)

    @contextlib.asynccontextmanager
    async def locked(
        self, upload_id: str, owner: str, *, takeover: bool = True
    ) -> AsyncIterator[tuple[Upload, Lease]]:
        """Hold the upload's lock: a running holder is asked to stop and commit (unless not
        `takeover`), and 423 follows if it does not let go within about a second. 404/410."""
        self.refuse_if_stopping()
        acquired = await self.state.acquire(upload_id, owner, LOCK_TTL_MS)
        deadline = time.monotonic() + TAKEOVER_WAIT_S
        waited = asked = False
        while acquired is None:
            waited = True
            if time.monotonic() > deadline:
                self.count_lock("locked")
                raise UploadLocked()
            if takeover:
                asked = await self.state.ask_holder(upload_id, "stop", LOCK_TTL_MS) or asked
            await asyncio.sleep(POLL_S)
            acquired = await self.state.acquire(upload_id, owner, LOCK_TTL_MS)
        if waited:
            self.count_lock("acquired")
            if asked:
                self.count_lock("takeover")
        upload, token = acquired
        async with self.held(upload_id, token) as lease:
            yield upload, lease

    @contextlib.asynccontextmanager
    async def held(self, upload_id: str, token: str) -> AsyncIterator[Lease]:
        """Keep the lock held with `token` renewed until the block ends, then release it."""
        lease = Lease(upload_id, token)
        self._held.add(lease)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_while_held())
        try:
            yield lease
        finally:
            self._held.discard(lease)
            if not lease.released:
                await asyncio.shield(self._release(lease))

    async def _renew_while_held(self) -> None:
        """While this process holds any lock: every ~100 ms, read the ask counters of the
        shards it holds locks in and pass on the requests to its holders in the shards
        whose counter moved (a takeover, a HEAD asking for a commit); every ~0.5 s, renew
        every lock (extending each that has less than 2.5 s left). Thousands of open
        uploads cost two round trips per tick, and touch each lock twice a second."""
        seen: dict[int, bytes | None] = {}  # each shard's ask counter at the last look
        renewed_all_at = 0.0
        while self._held and not was_cancelled():
            await asyncio.sleep(RENEW_INTERVAL_S)
            leases = [lease for lease in self._held if not (lease.released or lease.lost)]
            if not leases or was_cancelled():
                continue
            try:
                shards = sorted({lease.shard for lease in leases})
                counts = dict(zip(shards, await self.state.ask_counts(shards), strict=True))
                if time.monotonic() - renewed_all_at >= RENEW_ALL_S:
                    renewed_all_at = time.monotonic()
                else:
                    moved = {
                        shard
                        for shard, n in counts.items()
                        if shard not in seen or seen[shard] != n
                    }
                    leases = [lease for lease in leases if lease.shard in moved]
                seen.update(counts)
                if not leases:
                    continue
                locks = [(lease.upload_id, lease.token) for lease in leases]
                answers = await self.state.renew_many(
                    locks, LOCK_TTL_MS, extend_below_ms=LOCK_EXTEND_BELOW_MS
                )
            except Exception as error:  # Redis unreachable: stop before a lock can expire
                log.warning("renewing %d upload locks failed: %r", len(leases), error)
                seen.clear()
                for lease in leases:
                    if time.monotonic() - lease.renewed_at > LOCK_TTL_MS / 2000:
                        lease.lose()
                continue
            self._answer(leases, answers)

    def _answer(self, leases: list[Lease], answers: list[str | LockLost]) -> None:
        """Act on what a renewal found for each lease: lost, or a request to its holder."""
        now = time.monotonic()
        for lease, answer in zip(leases, answers, strict=True):
            if lease.released:  # let go of while the renewal was on its way
                continue
            if isinstance(answer, LockLost):
                log.warning("upload %s: its lock was lost (expired or taken)", lease.upload_id)
                lease.lose()
                continue
            lease.renewed_at = now
            commit = lease.answer(answer) if answer and not lease.released else None
            if commit is not None:
                self._start(commit)

    def _start(self, commit: Awaitable[object]) -> None:
        """Run a holder's commit beside the renewals (a slow disk must not delay them)."""

        async def run() -> None:
            with contextlib.suppress(Exception):
                await commit

        task = asyncio.create_task(run())
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)

    async def _release(self, lease: Lease) -> None:
        try:
            await self.state.release(lease.upload_id, lease.token)
        except Exception:  # the lock expires by itself within seconds
            log.warning("could not release the lock of %s", lease.upload_id, exc_info=True)

    def stop_all(self) -> None:
        """Graceful stop: refuse new locks, wake every holder (it commits and answers 503)."""
        self.is_stopping = True
        for lease in list(self._held):
            lease.wake(ShuttingDown())

    async def close(self) -> None:
        """Stop the renewals (after the requests holding locks have ended)."""
        for task in [self._renewer, *self._commits]:
            if task is not None:
                await cancel_and_wait(task)
