"""--body-memory: the bodies a process gathers in memory are shared out, not 8 MiB per upload.

Each streaming body holds up to two blocks (one gathering, one being written). The block is
the budget over twice the bodies streaming, between 256 KiB and 4 MiB, so the memory a
process holds for bodies stays near the budget however many uploads stream at once.
"""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest

from tests.support.raw_http import RawRequest, raw_patch
from tests.support.servers import Server, ServerFactory
from tests.support.tus import TUS, create_upload, repr_digest_of
from tests.support.waiting import wait_until
from tusserver.settings import SettingError, Settings
from tusserver.uploads.body import MIN_BLOCK_BYTES, WRITE_BLOCK_BYTES, BodyMemory

MiB = 2**20


def test_the_block_is_the_budget_shared_by_the_bodies_streaming() -> None:
    memory = BodyMemory(64 * MiB)
    blocks = {}
    for streaming in (0, 1, 8, 16, 64, 1000):
        memory.streaming = streaming
        blocks[streaming] = memory.block_bytes()
    assert blocks == {
        0: WRITE_BLOCK_BYTES, 1: WRITE_BLOCK_BYTES, 8: WRITE_BLOCK_BYTES,
        16: 2 * MiB, 64: 512 * 2**10, 1000: MIN_BLOCK_BYTES,
    }  # fmt: skip


def test_a_budget_under_one_mib_is_refused() -> None:
    with pytest.raises(SettingError, match="--body-memory"):
        Settings(body_memory_bytes=512 * 2**10)


async def test_concurrent_bodies_are_written_in_their_share_of_the_budget(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    """Four uploads stream at once under a 2 MiB budget: each writes blocks of 256 KiB, so a
    body paused after 1 MiB is already on disk but for its last block. With the blocks of a
    lone upload (4 MiB) nothing of it would be written until the body resumed."""
    server: Server = await make_server(body_memory_bytes=2 * MiB, receive_threads=0)
    memory = server.uploads.body_memory
    sources = [os.urandom(2 * MiB) for _ in range(4)]
    urls = [await create_upload(http, server.url, len(source)) for source in sources]
    files = [server.file_of(url) for url in urls]
    async with (
        raw_patch(urls[0], 0, 2 * MiB) as first, raw_patch(urls[1], 0, 2 * MiB) as second,
        raw_patch(urls[2], 0, 2 * MiB) as third, raw_patch(urls[3], 0, 2 * MiB) as fourth,
    ):  # fmt: skip
        requests: list[RawRequest] = [first, second, third, fourth]

        async def all_streaming() -> bool:
            return memory.streaming == 4

        # Only the headers are out: a body whose bytes arrived while fewer were streaming
        # would gather them in that moment's larger blocks (and keep up to one in memory).
        await wait_until(all_streaming)
        assert memory.block_bytes() == MIN_BLOCK_BYTES
        await asyncio.gather(*(r.send(s[:MiB]) for r, s in zip(requests, sources, strict=True)))

        async def each_written_but_its_last_block() -> bool:
            return all(path.stat().st_size >= MiB - MIN_BLOCK_BYTES for path in files)

        await wait_until(each_written_but_its_last_block)
        await asyncio.gather(*(r.send(s[MiB:]) for r, s in zip(requests, sources, strict=True)))
        answers = await asyncio.gather(*(r.response() for r in requests))
    assert [answer.status for answer in answers] == [204] * 4
    assert all(path.read_bytes() == source for path, source in zip(files, sources, strict=True))
    assert memory.streaming == 0
    for url, source in zip(urls, sources, strict=True):
        async with http.head(url, headers=TUS) as response:
            assert response.headers["Upload-Offset"] == str(2 * MiB)
            assert response.headers["Repr-Digest"] == repr_digest_of(source)
