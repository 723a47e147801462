"""The background sweeper: acts on uploads whose time in the expiry index has come.

One index serves three jobs, by the upload's status when its time comes: an `uploading` upload
has expired (state, then file, removed; `expired` event); a `received` upload was not hashed by
the process that received it (it crashed or stopped), so it is hashed now and completed; a
`completed` upload has passed its --retention and is removed. Any number of processes may
sweep at once: each step is atomic in Redis and takes the upload's lock where it works on it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tusserver.store.records import SHARD_COUNT
from tusserver.tasks import was_cancelled
from tusserver.uploads.service import LOCK_TTL_MS, RECEIVED_GRACE_S, Uploads

log = logging.getLogger("tusserver.uploads.expiry")


async def sweep_once(uploads: Uploads, now: float | None = None) -> int:
    """Handle every upload that is due; returns how many were acted on."""
    now = time.time() if now is None else now
    handled = 0
    for shard in range(SHARD_COUNT):
        for upload_id in await uploads.state.due(shard, now):
            upload = await uploads.state.get_any(upload_id)
            if upload is None:
                continue
            path = uploads.storage.relative_path(upload_id)
            if upload.status == "received":
                handled += await _finish(uploads, upload_id, now)
            elif await uploads.state.remove(
                upload, "expired", now=now, path=path, expired_before=now
            ):
                await uploads.storage.delete(upload_id)
                handled += 1
    return handled


async def _finish(uploads: Uploads, upload_id: str, now: float) -> int:
    token = await uploads.state.try_lock(upload_id, LOCK_TTL_MS * 20)
    if token is None:
        return 0
    try:
        await uploads.state.postpone(upload_id, now + RECEIVED_GRACE_S)
        upload = await uploads.state.get_any(upload_id)
        if upload is None or upload.status != "received":
            return 0
        await uploads.finish(upload)
        return 1
    finally:
        await uploads.state.release(upload_id, token)


async def sweep_forever(uploads: Uploads, interval_s: float) -> None:
    """Sweep now and then every `interval_s`, logging (not dying on) failures."""
    while not was_cancelled():
        try:
            handled = await sweep_once(uploads)
            if handled:
                log.info("sweeper handled %d uploads", handled)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("sweep failed; retrying later", exc_info=True)
        if was_cancelled():
            break
        await asyncio.sleep(interval_s)
