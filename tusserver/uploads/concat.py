"""Concatenation: a final upload made of complete partial uploads of one owner, their bytes
copied in order into a file of its own, hashed, and stored `completed` in one step."""

from __future__ import annotations

import contextlib
import time

from tusserver.auth import NO_BATCH_QUOTA, BatchQuota
from tusserver.errors import BadRequest, UploadGone, UploadNotFound
from tusserver.store.records import Upload, new_upload_id
from tusserver.uploads.body import SizeLimit
from tusserver.uploads.service import NewUpload, Uploads


async def concatenate(
    uploads: Uploads,
    *,
    owner: str,
    partial_ids: list[str],
    metadata: str,
    url_of: str,
    limit: SizeLimit,
    quota: BatchQuota = NO_BATCH_QUOTA,
) -> Upload:
    """Create a final upload from complete partial uploads of `owner`, locked in a fixed
    order (they live in different shards). 400 for unknown, foreign, unfinished or
    non-partial uploads; 413 past `limit`. A final upload may join a batch (`Uploads.admit`);
    its parts never do."""
    for partial_id in partial_ids:  # refuse early, without touching a running upload
        try:
            _check_partial(partial_id, await uploads.state.get(partial_id, owner))
        except (UploadNotFound, UploadGone):
            raise BadRequest(f"partial upload {partial_id} does not exist") from None
    async with contextlib.AsyncExitStack() as stack:
        partials: dict[str, Upload] = {}
        for partial_id in sorted(set(partial_ids)):
            try:
                partial, _lease = await stack.enter_async_context(
                    uploads.leases.locked(partial_id, owner, takeover=False)
                )
            except (UploadNotFound, UploadGone):
                raise BadRequest(f"partial upload {partial_id} does not exist") from None
            partials[partial_id] = _check_partial(partial_id, partial)
        parts = [(pid, partials[pid].length or 0) for pid in partial_ids]
        length = sum(part_length for _, part_length in parts)
        limit.check(length, "the final upload")
        admitted = await uploads.admit(
            NewUpload(owner=owner, length=length, metadata=metadata, concat="", url_of=url_of,
                      quota=quota)
        )  # fmt: skip
        final_id = admitted.upload_id or new_upload_id()
        await uploads.storage.concatenate(final_id, parts)
        sha256 = await uploads.storage.sha256(final_id, length)
        now = time.time()
        final = Upload(
            upload_id=final_id, owner=owner, offset=length, length=length,
            metadata=metadata, status="completed", created_at=now,
            expires_at=uploads.lifetimes.expires_at("completed", now),
            url=url_of.replace("{id}", final_id),
            concat="final;" + " ".join(partial_ids), sha256=sha256,
            batch=admitted.batch, batch_path=admitted.batch_path,
        )  # fmt: skip
        await uploads.state.create(final)
        return final


def _check_partial(partial_id: str, partial: Upload) -> Upload:
    """The partial upload, if a final upload may be built from it (400 otherwise)."""
    if not partial.is_partial:
        raise BadRequest(f"upload {partial_id} is not a partial upload")
    if partial.status == "uploading":
        raise BadRequest(f"partial upload {partial_id} is not complete")
    return partial
