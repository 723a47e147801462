"""The lock renewals of a process that holds many locks (uploads/lease.py), against a real
Redis: every lock is renewed about twice a second, not on every tick, and a request to one
holder still reaches it on the next tick (only its shard's locks are looked at for that)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from tusserver.store.records import keys_of, new_upload_id, shard_of
from tusserver.store.state import UploadState
from tusserver.uploads.lease import LOCK_TTL_MS, Lease, Leases

LOCKS = 64
TICKS = 10  # RENEW_INTERVAL_S apart: about a second


class RecordedState(UploadState):
    """The real state, which also notes the size of each renewal and counts the ticks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.renewal_sizes: list[int] = []
        self.ticks = 0
        self.ticked = asyncio.Event()

    async def renew_many(self, locks: list[tuple[str, str]], *args: Any, **kwargs: Any) -> Any:
        self.renewal_sizes.append(len(locks))
        return await super().renew_many(locks, *args, **kwargs)

    async def ask_counts(self, shards: list[int]) -> list[bytes | None]:
        self.ticks += 1
        self.ticked.set()
        return await super().ask_counts(shards)


@pytest.fixture
async def state(flushed_redis: str) -> AsyncIterator[RecordedState]:
    client = aioredis.Redis.from_url(flushed_redis)
    yield RecordedState(client, tombstone_ttl_s=60, path_of=lambda upload_id: upload_id)
    await client.aclose()


def setter(event: asyncio.Event) -> Callable[[Exception], None]:
    return lambda _error: event.set()


async def ticks(state: RecordedState, count: int) -> None:
    """Wait until the renewer has ticked `count` more times."""
    until = state.ticks + count
    while state.ticks < until:
        state.ticked.clear()
        await asyncio.wait_for(state.ticked.wait(), 5)


async def test_many_locks_are_renewed_twice_a_second_and_a_request_arrives_next_tick(
    state: RecordedState,
) -> None:
    leases = Leases(state)
    woken: dict[str, asyncio.Event] = {}
    async with contextlib.AsyncExitStack() as holding:
        held: list[Lease] = []
        for _ in range(LOCKS):
            upload_id = new_upload_id()
            token = await state.try_lock(upload_id, LOCK_TTL_MS)
            assert token is not None
            lease = await holding.enter_async_context(leases.held(upload_id, token))
            woken[upload_id] = event = asyncio.Event()
            lease.listen(wake_reader=setter(event))
            held.append(lease)

        await ticks(state, TICKS)
        full = [size for size in state.renewal_sizes if size == LOCKS]
        assert 1 <= len(full) <= 3  # every lock about twice a second, not ten times
        assert state.renewal_sizes == full  # nobody was asked anything: no other renewal

        target = held[LOCKS // 2]
        state.renewal_sizes.clear()
        while LOCKS not in state.renewal_sizes:  # right after a renewal of all: the next
            await ticks(state, 1)  # is ~0.5 s away, the next tick ~0.1 s
        state.renewal_sizes.clear()
        assert await state.ask_holder(target.upload_id, "stop", LOCK_TTL_MS)
        await asyncio.wait_for(woken[target.upload_id].wait(), 2)
        assert target.stop_requested
        same_shard = sum(1 for lease in held if lease.shard == shard_of(target.upload_id))
        assert state.renewal_sizes[0] == same_shard  # only that shard's locks were looked at
        assert [upload_id for upload_id, event in woken.items() if event.is_set()] == [
            target.upload_id
        ]
        for lease in held:  # every lock was kept all along
            [lock] = keys_of(lease.upload_id, "lock")
            assert await state.redis.get(lock) == lease.token.encode()
    await leases.close()
