"""Events for the parent service: webhook delivery from the outbox (parent.py signs them).

The outbox is the per-shard stream `tus:{<shard>}:events`, written by the Lua steps of
`state.py` together with the change they report. With --webhook-url every tusserver process
joins one consumer group per stream: each event goes to one process, which POSTs it as signed
JSON, retries with exponential backoff and jitter, and acknowledges and deletes it only after a
2xx. Entries a dead process held are claimed by another once they have been idle for a while.
Events that still fail after a bounded number of tries or age move to the dead-letter stream
`tus:{<shard>}:dead`. docs/events.md describes the wire format and how to verify signatures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from tusserver import randomness
from tusserver.events.entries import Entry, entries_of
from tusserver.events.parent import (
    CountResult,
    PreCreateCheck,
    post_headers,
    read_some,
    signing_secrets_of,
)
from tusserver.settings import Settings
from tusserver.store import webhook_lua as lua
from tusserver.store.client import RedisClient, connect
from tusserver.store.records import SHARD_COUNT, as_text, flat_pairs, redis_key
from tusserver.tasks import cancel_and_wait, was_cancelled

log = logging.getLogger("tusserver.events.delivery")

GROUP = "tusserver-webhook"
DEAD_LETTER_MAXLEN = 10_000
MAX_IN_FLIGHT_PER_SHARD = 8
READ_BLOCK_MS = 1000
READ_RETRY_S = 1.0
FORGET_CONSUMER_AFTER_MS = 3600 * 1000
# What `WebhookDelivery` tells its `count` callback: each try's result, and a burial.
DELIVERED, REFUSED, TIMEOUT, UNREACHABLE, DEAD_LETTERED = (
    "delivered", "refused", "timeout", "unreachable", "dead_lettered",
)  # fmt: skip


def _uncounted(_result: str) -> None:
    return None


def events_key(shard: int) -> str:
    return redis_key(shard, "events")


def dead_letter_key(shard: int) -> str:
    return redis_key(shard, "dead")


class Outbox:
    """The consumer-group side of the event streams: all Redis access of delivery."""

    def __init__(
        self,
        client: RedisClient,
        *,
        consumer: str | None = None,
        dead_letter_maxlen: int = DEAD_LETTER_MAXLEN,
    ) -> None:
        self.redis = client
        self.consumer = (
            consumer or f"{socket.gethostname()}:{os.getpid()}:{randomness.token_hex(3)}"
        )
        self.dead_letter_maxlen = dead_letter_maxlen
        self._hold: AsyncScript = client.register_script(lua.WEBHOOK_HOLD)
        self._acknowledge: AsyncScript = client.register_script(lua.WEBHOOK_ACKNOWLEDGE)
        self._bury: AsyncScript = client.register_script(lua.WEBHOOK_BURY)
        self._forget: AsyncScript = client.register_script(lua.WEBHOOK_FORGET)

    async def ensure_group(self, shard: int) -> None:
        """Create the group (from the stream's start, so nothing written before is skipped)."""
        try:
            await self.redis.xgroup_create(events_key(shard), GROUP, "0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    async def read_new(self, shard: int, count: int, block_ms: int | None) -> list[Entry]:
        """Up to `count` entries never delivered to any process; waits up to `block_ms`."""
        reply: list[tuple[bytes, Sequence[Any]]] | None = await self.redis.xreadgroup(
            GROUP, self.consumer, {events_key(shard): ">"}, count=count, block=block_ms
        )  # type: ignore[assignment]  # RESP2: [[stream, rows]], None after a timeout
        return [entry for _stream, rows in reply or [] for entry in entries_of(shard, rows)]

    async def claim_stale(
        self, shard: int, count: int, min_idle_ms: int, cursor: str
    ) -> tuple[list[Entry], str]:
        """Take over up to `count` entries nobody touched for `min_idle_ms` (their process
        died); the cursor to go on from, "0-0" when the scan went round."""
        reply = await self.redis.xautoclaim(
            events_key(shard), GROUP, self.consumer, min_idle_ms, cursor, count=count
        )
        return entries_of(shard, reply[1]), as_text(reply[0])

    async def hold(self, entry: Entry, *, new_try: bool) -> int:
        """Keep the entry ours (resets its idle time); its tries, or 0
        (`WebhookHold.NOT_HELD`) if it is not ours."""
        tries = await self._hold(
            keys=[events_key(entry.shard)],
            args=[GROUP, self.consumer, entry.stream_id, 1 if new_try else 0],
        )
        return int(tries)

    async def acknowledge(self, entry: Entry) -> None:
        """The parent has it: acknowledge and delete the entry."""
        await self._acknowledge(keys=[events_key(entry.shard)], args=[GROUP, entry.stream_id])

    async def bury(self, entry: Entry, *, tries: int, error: str) -> bool:
        """Move the entry to the shard's dead-letter stream; False if it is not ours."""
        dead = {**entry.fields, "event_id": entry.event_id, "tries": str(tries), "error": error}
        moved = await self._bury(
            keys=[events_key(entry.shard), dead_letter_key(entry.shard)],
            args=[
                GROUP,
                self.consumer,
                entry.stream_id,
                self.dead_letter_maxlen,
                *flat_pairs(dead),
            ],
        )
        return lua.WebhookBury(int(moved)) is lua.WebhookBury.BURIED

    async def forget_idle_consumers(self, shard: int, idle_ms: int) -> None:
        """Remove consumers of dead processes once they hold nothing and were long idle."""
        for consumer in await self.redis.xinfo_consumers(events_key(shard), GROUP):
            name = as_text(consumer["name"])
            if name != self.consumer and int(consumer["idle"]) > idle_ms:
                await self._forget(keys=[events_key(shard)], args=[GROUP, name])

    async def leave(self) -> None:
        """Remove this process's consumer from every group where it holds nothing."""
        for shard in range(SHARD_COUNT):
            await self._forget(keys=[events_key(shard)], args=[GROUP, self.consumer])


# -- webhook delivery ----------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard delivery tries. An entry held by a process is touched at least every
    `claim_idle_s / 3`, so only a dead process's entries go idle long enough to be claimed."""

    timeout_s: float = 10.0
    max_tries: int = 20
    max_age_s: float = 24 * 3600.0
    backoff_s: float = 1.0
    backoff_max_s: float = 600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryPolicy:
        return cls(
            timeout_s=settings.webhook_timeout_s,
            max_tries=settings.webhook_max_tries,
            max_age_s=settings.webhook_max_age_s,
            backoff_s=settings.webhook_backoff_s,
            backoff_max_s=settings.webhook_backoff_max_s,
        )

    @property
    def claim_idle_s(self) -> float:
        return max(3 * self.timeout_s, 1.0)

    def delay_before(self, next_try: int) -> float:
        """Exponential backoff with jitter before try `next_try` (2 or more): between half
        and all of backoff_s * 2**(next_try - 2), at most backoff_max_s."""
        ceiling = min(self.backoff_max_s, self.backoff_s * 2 ** min(next_try - 2, 30))
        return random.uniform(ceiling / 2, ceiling)


class WebhookDelivery:
    """Sends every event of the outbox to the parent's webhook, at least once each; tells
    `count` each try's result (DELIVERED, REFUSED, TIMEOUT, UNREACHABLE) and each burial
    (DEAD_LETTERED)."""

    def __init__(
        self,
        outbox: Outbox,
        session: aiohttp.ClientSession,
        url: str,
        signing_secrets: Sequence[str],
        policy: DeliveryPolicy,
        count: CountResult = _uncounted,
    ) -> None:
        self.count = count
        self.outbox = outbox
        self.session = session
        self.url = url
        self.signing_secrets = tuple(signing_secrets)
        self.policy = policy
        self.readers: list[asyncio.Task[None]] = []
        self.deliveries: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """One reader per shard stream, in the background until `stop`."""
        self.readers = [
            asyncio.create_task(_ShardReader(self, s).run()) for s in range(SHARD_COUNT)
        ]

    async def stop(self) -> None:
        """Stop reading, then stop running deliveries (their entries stay pending, and are
        claimed again after a while by this or another process)."""
        await _cancel_all(self.readers)
        await _cancel_all(list(self.deliveries))  # all there are, now that nobody reads

    async def deliver(self, entry: Entry) -> None:
        """POST the entry until a 2xx, then acknowledge it; bury it after the last try."""
        tries = await self.outbox.hold(entry, new_try=False)
        failed_before = False
        while tries and not was_cancelled():
            error = await self._post(entry, tries)
            if error is None:
                await asyncio.shield(self.outbox.acknowledge(entry))
                return
            if tries >= self.policy.max_tries or entry.age_s(time.time()) > self.policy.max_age_s:
                await self._bury(entry, tries, error)
                return
            if not failed_before:
                log.warning("event %s not delivered yet (%s); retrying", entry.event_id, error)
                failed_before = True
            if not await self._wait_holding(entry, self.policy.delay_before(tries + 1)):
                return
            tries = await self.outbox.hold(entry, new_try=True)

    async def _post(self, entry: Entry, tries: int) -> str | None:
        """One try: None on a 2xx, else what went wrong (never the URL: it may hold secrets)."""
        body = entry.body()
        headers = post_headers(self.signing_secrets, body)
        headers |= {"Tus-Event-Id": entry.event_id, "Tus-Event-Attempt": str(tries)}
        try:
            async with self.session.post(
                self.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                await read_some(response, 4096)
                if 200 <= response.status < 300:
                    self.count(DELIVERED)
                    return None
                self.count(REFUSED)
                return f"HTTP {response.status}"
        except TimeoutError:
            self.count(TIMEOUT)
            return f"no answer within {self.policy.timeout_s:g}s"
        except aiohttp.ClientError as error:
            self.count(UNREACHABLE)
            return f"{type(error).__name__}: {error}"

    async def _wait_holding(self, entry: Entry, delay_s: float) -> bool:
        """Sleep `delay_s`, keeping the entry ours; False if another process took it."""
        deadline = time.monotonic() + delay_s
        while (left := deadline - time.monotonic()) > 0 and not was_cancelled():
            await asyncio.sleep(min(left, self.policy.claim_idle_s / 3))
            if not await self.outbox.hold(entry, new_try=False):
                return False
        return True

    async def _bury(self, entry: Entry, tries: int, error: str) -> None:
        if await asyncio.shield(self.outbox.bury(entry, tries=tries, error=error)):
            self.count(DEAD_LETTERED)
            log.error(
                "event %s (%s of upload %s) failed %d tries, last: %s; moved to %s",
                entry.event_id,
                entry.fields.get("type", ""),
                entry.fields.get("upload_id", ""),
                tries,
                error,
                dead_letter_key(entry.shard),
            )


async def _cancel_all(tasks: Sequence[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        await cancel_and_wait(task)


class _ShardReader:
    """Reads one shard's stream for the group: new entries, and stale ones of dead processes,
    keeping at most MAX_IN_FLIGHT_PER_SHARD deliveries running."""

    def __init__(self, delivery: WebhookDelivery, shard: int) -> None:
        self.delivery = delivery
        self.outbox = delivery.outbox
        self.shard = shard
        self.in_flight: set[asyncio.Task[None]] = set()
        self.has_group = False
        self.claim_cursor = "0-0"
        self.claim_at = 0.0

    async def run(self) -> None:
        failing = False
        try:
            while not was_cancelled():  # redis-py may swallow a cancel on Python 3.11
                try:
                    await self._step()
                except RedisError as error:
                    if not failing:  # once per outage, not once a second
                        log.warning("reading events of shard %d failed: %s", self.shard, error)
                except Exception:
                    log.exception("reading events of shard %d failed", self.shard)
                else:
                    failing = False
                    continue
                failing = True
                self.has_group = False  # a flushed Redis lost it: make it again
                await asyncio.sleep(READ_RETRY_S)
        finally:
            for task in self.in_flight:  # WebhookDelivery.stop waits for them
                task.cancel()

    async def _step(self) -> None:
        if not self.has_group:
            await self.outbox.ensure_group(self.shard)
            self.has_group = True
        free = MAX_IN_FLIGHT_PER_SHARD - len(self.in_flight)
        if free <= 0:
            await asyncio.wait(self.in_flight, return_when=asyncio.FIRST_COMPLETED)
            return
        entries = await self._claim_stale(free) if time.monotonic() >= self.claim_at else []
        if len(entries) < free:
            until_claim_ms = int((self.claim_at - time.monotonic()) * 1000)
            block_ms = None if entries else max(1, min(READ_BLOCK_MS, until_claim_ms))
            entries += await self.outbox.read_new(self.shard, free - len(entries), block_ms)
        for entry in entries:
            task = asyncio.create_task(self._deliver(entry))
            for tasks in (self.in_flight, self.delivery.deliveries):
                tasks.add(task)
                task.add_done_callback(tasks.discard)

    async def _claim_stale(self, count: int) -> list[Entry]:
        policy = self.delivery.policy
        idle_ms = int(policy.claim_idle_s * 1000)
        entries, self.claim_cursor = await self.outbox.claim_stale(
            self.shard, count, idle_ms, self.claim_cursor
        )
        if self.claim_cursor == "0-0":  # went round: look again in a while
            self.claim_at = time.monotonic() + policy.claim_idle_s / 2
            await self.outbox.forget_idle_consumers(self.shard, FORGET_CONSUMER_AFTER_MS)
        return entries

    async def _deliver(self, entry: Entry) -> None:
        try:
            await self.delivery.deliver(entry)
        except RedisError as error:  # the entry stays pending and is claimed again later
            log.warning("event %s: Redis failed during delivery: %s", entry.event_id, error)
        except Exception:
            log.exception("event %s: delivery failed unexpectedly", entry.event_id)


# -- the app's resource --------------------------------------------------------------------


def events_context(
    settings: Settings,
    redis_url: str,
    pre_create: PreCreateCheck,
    count_webhook: CountResult = _uncounted,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's cleanup_ctx entry: the pre-create check's client, and webhook delivery when
    --webhook-url is set (its results told to `count_webhook`)."""

    async def context(_app: web.Application) -> AsyncIterator[None]:
        await pre_create.start()
        try:
            if settings.webhook_url is None:
                yield
            else:
                url = settings.webhook_url
                async with _delivering(settings, url, redis_url, count_webhook):
                    yield
        finally:
            await pre_create.close()

    return context


@contextlib.asynccontextmanager
async def _delivering(
    settings: Settings, url: str, redis_url: str, count: CountResult
) -> AsyncIterator[None]:
    """Run webhook delivery in the background while the block runs."""
    policy = DeliveryPolicy.from_settings(settings)
    signing = signing_secrets_of(settings)
    if not signing:
        log.warning(
            "webhook events are sent unsigned: set --webhook-secret (or --secret) so the "
            "parent can tell them from forgeries"
        )
    client = await connect(redis_url)  # blocking reads hold connections: apart from requests'
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=policy.timeout_s))
    outbox = Outbox(client)
    delivery = WebhookDelivery(outbox, session, url, signing, policy, count)
    delivery.start()
    try:
        yield
    finally:
        await delivery.stop()
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(2):
                await outbox.leave()
        await session.close()
        await client.aclose()
