"""The event loop's side of a body read in a thread (`files/receive.py`): start the thread,
commit what it reports once a second, pass on a stop, and turn its receipt into the end of
the transfer (`AppendSession._stream` then verifies, commits and answers as for a body read
on the loop).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import TYPE_CHECKING, Protocol

from tusserver.aiohttp_private import TakenBody
from tusserver.files.receive import Reception
from tusserver.files.storage import Storage, UploadFile
from tusserver.store.records import Upload
from tusserver.store.state import LockLost
from tusserver.uploads.body import BodyMemory, ShuttingDown

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

log = logging.getLogger("tusserver.uploads")

COMMIT_INTERVAL_S = 1.0


class ReceivingSession(Protocol):
    """What of an `AppendSession` a body read in a thread uses and moves on."""

    upload: Upload
    file: UploadFile | None
    written: int  # set from the thread as blocks are written
    synced: int  # set from the thread after its own syncs
    hashes: list[Hash]
    running_hash: Hash | None
    may_commit: bool
    stop: threading.Event
    stop_error: Exception | None
    end_unknown: bool

    @property
    def upload_id(self) -> str: ...

    async def commit(
        self, ack: str = "", *, release: bool = False, durable_only: bool = False
    ) -> Upload: ...


async def receive_taken(
    session: ReceivingSession, taken: TakenBody, storage: Storage, idle_s: float,
    memory: BodyMemory,
) -> None:  # fmt: skip
    """Move a body taken from its connection onto `session`'s file in a receiving thread
    (`UploadFile.receive`), committing once a second meanwhile what the thread reports:
    under --fsync always, what its own sync thread made durable (so the shared threads
    never wait for this body's disk writes; a HEAD's commit may still sync the rest). It
    never reports the body's last block, so no commit beside it completes the upload.
    `memory` sizes its blocks and picks its hashing threads, before each block."""
    assert session.file is not None

    loop = asyncio.get_running_loop()
    made_durable = asyncio.Event()  # the thread synced: commit now, not at the next tick

    def written(end: int) -> None:  # from the receiving thread, its only writer meanwhile
        session.written = end

    def durable(end: int) -> None:  # from the sync thread: moved on by the loop, which
        loop.call_soon_threadsafe(mark_durable, end)  # also sets it (a commit's own sync)

    def mark_durable(end: int) -> None:
        session.synced = max(session.synced, end)
        made_durable.set()

    how = Reception(
        check_free_space=storage.check_free_space, start_writeback=storage.start_writeback,
        block_bytes=memory.receive_block_bytes,
        hasher=lambda: storage.bulk_for(memory.is_few()), syncer=storage.receive_syncs,
        hashes=session.hashes, stop=session.stop, idle_s=idle_s,
        sync_every_s=COMMIT_INTERVAL_S if storage.fsync == "always" else 0.0,
        on_written=written, on_durable=durable,
    )  # fmt: skip
    receiving = asyncio.ensure_future(
        session.file.receive(taken.fd, taken.buffered, taken.remaining, session.written, how)
    )
    try:
        while not receiving.done():
            synced = asyncio.ensure_future(made_durable.wait())
            await asyncio.wait(
                {receiving, synced}, timeout=COMMIT_INTERVAL_S,
                return_when=asyncio.FIRST_COMPLETED,
            )  # fmt: skip
            synced.cancel()
            made_durable.clear()
            ready = session.synced if how.sync_every_s else session.written
            if not receiving.done() and session.may_commit and ready > session.upload.offset:
                await _commit_beside(session, durable_only=how.sync_every_s > 0)
    finally:
        session.stop.set()  # the thread ends within its poll interval
        if not receiving.done():
            await asyncio.wait({receiving})
    try:
        receipt = receiving.result()  # a failed write raises here (507, 500)
    except BaseException:
        session.end_unknown = True
        if session.running_hash is not None:  # it may lack blocks: the file is hashed later
            session.hashes.remove(session.running_hash)
            session.running_hash = None
        raise
    session.written = receipt.end
    if receipt.ending == "done":
        taken.give_back()  # the connection serves the client's next request
    if receipt.ending == "stopped":
        raise session.stop_error or ShuttingDown()
    if receipt.ending == "idle":
        raise TimeoutError()
    if receipt.ending == "hung up":
        raise ConnectionResetError("the client closed the connection mid-body")


async def _commit_beside(session: ReceivingSession, *, durable_only: bool) -> None:
    """A periodic commit beside a body still arriving (`commit`). A lost lock stops the
    body; any other failure (Redis unreachable) is left to the lease, which stops the
    body once its lock can no longer be renewed, and the next commit tries again."""
    try:
        await session.commit(durable_only=durable_only)
    except LockLost:
        raise
    except Exception as error:
        log.warning("upload %s: a commit failed, the body goes on: %r", session.upload_id, error)
