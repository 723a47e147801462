"""The background sweeper: acts on uploads whose time in the expiry index has come.

One index serves three jobs, by the upload's status when its time comes: an `uploading` upload
has expired (state, then file, removed; `expired` event); a `received` upload was not hashed by
the process that received it (it crashed or stopped), so it is hashed now and completed; a
`completed` upload has passed its --retention and is removed. Batches have an index of their
own (uploads/batches.py: `Batches.expire`). Now and then it also removes
upload files that no record names (`remove_orphans`). Any number of processes may
sweep at once: each step is atomic in Redis and takes the upload's lock where it works on it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from tusserver.store.records import SHARD_COUNT
from tusserver.tasks import was_cancelled
from tusserver.uploads.batches import Batches
from tusserver.uploads.service import Uploads

log = logging.getLogger("tusserver.uploads.expiry")
ORPHAN_BATCH = 1000  # ids checked in one Redis round trip
ORPHANS_WITHOUT_DOUBT = 10  # more orphans than this, and no file with a record: suspect Redis


async def sweep_once(uploads: Uploads, now: float | None = None) -> int:
    """Handle every upload and batch that is due; returns how many were acted on."""
    now = time.time() if now is None else now
    handled = 0
    for shard in range(SHARD_COUNT):
        for upload in await uploads.due(shard, now):
            if upload.status == "received":
                handled += await uploads.finish_received(upload.upload_id, now)
            else:
                handled += await uploads.expire(upload, now)
    return handled + await Batches(uploads).sweep(now)


async def sweep_forever(uploads: Uploads, interval_s: float) -> None:
    """Sweep now and then every `interval_s`, logging (not dying on) failures; look for
    orphaned files (`remove_orphans`) at start and then every quarter of
    --orphan-grace, since that reads every folder of the data directory."""
    orphans_due = 0.0
    while not was_cancelled():
        try:
            handled = await sweep_once(uploads)
            if handled:
                log.info("sweeper handled %d uploads", handled)
            if time.monotonic() >= orphans_due:
                orphans_due = time.monotonic() + uploads.orphan_grace_s / 4
                await remove_orphans(uploads, time.time())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("sweep failed; retrying later", exc_info=True)
        if was_cancelled():
            break
        await asyncio.sleep(interval_s)


async def remove_orphans(uploads: Uploads, now: float) -> int:
    """Remove the upload files that no record names and that have not changed for
    --orphan-grace (a crash between a file and its record, or between a record's removal
    and its file's): how many were removed. When no old file at all has a record (more
    than a few of them), nothing is removed: that is a Redis that lost its state, not a
    crash, and the operator is told so."""
    old = await uploads.storage.files_older_than(now - uploads.orphan_grace_s)
    orphans: list[str] = []
    for start in range(0, len(old), ORPHAN_BATCH):
        orphans += await uploads.state.unknown(old[start : start + ORPHAN_BATCH])
    if len(orphans) > ORPHANS_WITHOUT_DOUBT and len(orphans) == len(old):
        log.error(
            "none of the %d upload files older than --orphan-grace has a record in Redis: "
            "is this the Redis that holds their state? Nothing was removed.",
            len(old),
        )
        return 0
    for upload_id in orphans:
        log.warning("removing upload file %s: no record names it", upload_id)
        await uploads.storage.delete(upload_id)
    return len(orphans)
