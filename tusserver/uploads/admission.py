"""Admission: what a creation asks for (`NewUpload`), and the step before an upload is
created that joins it to the batch its metadata names (docs/events.md, "Batches")."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from tusserver import batching, protocol
from tusserver.auth import NO_BATCH_QUOTA, BatchQuota
from tusserver.errors import Forbidden
from tusserver.store.batches import BatchState
from tusserver.store.records import batch_key_of, new_upload_id, shard_of
from tusserver.uploads.lifetimes import Lifetimes


@dataclass(frozen=True)
class NewUpload:
    """What a creation request asks for (checked by the handler)."""

    owner: str
    length: int | None  # None: deferred
    metadata: str  # the Upload-Metadata header as stored
    concat: str  # "partial" or ""
    url_of: str  # the upload URL with "{id}" for its id
    # An id chosen ahead (`Uploads.new_id`), so an interim answer can name the upload before
    # its body is read; "" lets `create` choose.
    upload_id: str = ""
    # The digest of a token that may finish this upload after its expiry (Grant.created_by).
    created_by: str = ""
    # What the token allows of batches; a `batch` in the metadata makes the upload a member.
    quota: BatchQuota = NO_BATCH_QUOTA
    # Set once it joined its batch (`Uploads.admit`): the batch's key and the member's path.
    batch: str = ""
    batch_path: str = ""


def new_id(owner: str = "", metadata: str = "") -> str:
    """A fresh upload id, for a `NewUpload` whose URL must be known before it exists: in
    the shard of the batch its `metadata` names, if any (400 for an invalid batch)."""
    membership = _membership(metadata)
    if membership is None:
        return new_upload_id()
    return new_upload_id(shard_of(batch_key_of(owner, membership.batch)))


async def admit(batch_state: BatchState, lifetimes: Lifetimes, new: NewUpload) -> NewUpload:
    """A new upload whose metadata names a batch (`batch`, with its path from
    `relativePath`, `path` or `filename`) joins it before it is created, the batch made
    now if it has not been: it gets an id in the batch's shard (its chosen one if that
    is there). 400 for an invalid name or path; 403 past the token's batch, 404/409/413
    as the batch allows (store/batches.py). Others pass as they are, unless the token
    allows only its own batch (403). Partial uploads never join: their final upload
    does."""
    if new.concat == "partial":  # a part of a final upload; the final one is the member
        return new
    membership, quota = _membership(new.metadata), new.quota
    if membership is None:
        if quota.name is not None:
            raise Forbidden("this token creates uploads in its batch only (metadata batch)")
        return new
    if quota.name is not None and quota.name != membership.batch:
        raise Forbidden("this token creates uploads in another batch")
    now = time.time()
    key, upload_id = await batch_state.join(
        new.owner, membership.batch, membership.path,
        length=new.length, now=now, expires_at=now + lifetimes.expire_after_s,
        url=batch_url(new.url_of, membership.batch), retention_s=lifetimes.retention_s,
        quota=quota, implicit=True, upload_id=new.upload_id,
    )  # fmt: skip
    return replace(new, upload_id=upload_id, batch=key, batch_path=membership.path)


def batch_url(url_of: str, name: str) -> str:
    """A batch's URL, beside its uploads': `<endpoint>batches/<name>`."""
    return url_of.replace("{id}", f"batches/{name}")


def _membership(metadata: str) -> batching.Membership | None:
    """The batch and path the stored `Upload-Metadata` names, if any (400 if invalid)."""
    return batching.batch_membership(protocol.parse_metadata(metadata))
