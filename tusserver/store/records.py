"""An upload as Redis holds it: ids, shards, key names, and the `Upload` record.

No Redis calls here (those are in `state.py`): only how an upload is named, where its keys
live, and how its hash reads back.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from tusserver import randomness
from tusserver.protocol import current_request_id

SHARD_COUNT = 16
UploadStatus = Literal["uploading", "received", "completed"]
EventType = Literal["created", "completed", "terminated", "expired"]

# Ids are 32 lowercase hex characters: URL-safe, and safe as a file name by construction.
ID_ALPHABET = frozenset("0123456789abcdef")
ID_LENGTH = 32


def new_upload_id(shard: int | None = None) -> str:
    """A random id; with `shard`, one that lies in that shard (a batch's members lie in the
    batch's shard, so a member's completion and the batch's count are one atomic step)."""
    upload_id = randomness.token_hex(ID_LENGTH // 2)
    if shard is None:
        return upload_id
    return upload_id[0] + f"{shard:x}" + upload_id[2:]  # shard_of reads the second digit


def batch_key_of(owner: str, name: str) -> str:
    """The id under which a batch is stored: its name is the owner's choice, so two owners'
    batches of one name are two batches (a digest of both, shaped like an upload id)."""
    digest = hashlib.sha256(f"{owner}\0{name}".encode()).hexdigest()
    return digest[:ID_LENGTH]


def is_upload_id(value: str) -> bool:
    return len(value) == ID_LENGTH and set(value) <= ID_ALPHABET


def shard_of(upload_id: str) -> int:
    return int(upload_id[:2], 16) % SHARD_COUNT


def redis_key(shard: int, kind: str, name: str = "") -> str:
    """`tus:{<shard>}:<kind>[:<name>]`: the shard is the Redis Cluster hash tag."""
    return f"tus:{{{shard}}}:{kind}" + (f":{name}" if name else "")


# Kinds of key that belong to one upload or batch (named by its id); the others belong to its
# shard, and `owner:<subject>` to an owner's index in that shard. A batch has its record
# (`batch`), its paths (`bfiles`: path -> "<upload id> <length>") and its completed members
# (`bdone`: path -> the member as JSON).
PER_UPLOAD_KINDS = frozenset({"upload", "lock", "release", "tomb", "batch", "bfiles", "bdone"})
BATCH_KINDS = ("batch", "bfiles", "bdone", "bexpiry")


def keys_of(upload_id: str, *kinds: str) -> list[str]:
    """The keys of `upload_id`'s shard that a step touches, in the order given: `upload`,
    `lock`, `release`, `tomb` (the upload's own), `batch`, `bfiles`, `bdone` (a batch's
    own), `expiry`, `bexpiry`, `events` (the shard's), or `owner:<subject>` (an owner's
    index)."""
    shard = shard_of(upload_id)
    keys = []
    for kind in kinds:
        kind, _, subject = kind.partition(":")
        name = upload_id if kind in PER_UPLOAD_KINDS else subject
        keys.append(redis_key(shard, kind, name))
    return keys


@dataclass(frozen=True)
class Upload:
    """One upload as Redis holds it."""

    upload_id: str
    owner: str
    offset: int
    length: int | None  # None while deferred
    metadata: str  # the Upload-Metadata header as the client sent it (normalised)
    status: UploadStatus
    created_at: float
    expires_at: float | None
    url: str
    concat: str = ""  # "", "partial" or "final;<id> <id> ..."
    sha256: str = ""  # hex, once completed
    # A digest of the token that created the upload when that token may finish it after its
    # expiry (the `fin` claim; never the token itself), else "".
    created_by: str = ""
    batch: str = ""  # the key of the batch it belongs to (batch_key_of), else ""
    batch_path: str = ""  # its path inside that batch
    # When its offset last went to Redis's AOF (a checkpoint: UploadState.commit); 0: never
    # since its creation, which was durable.
    checkpoint_at: float = 0.0

    @property
    def is_complete(self) -> bool:
        return self.length is not None and self.offset == self.length

    @property
    def is_partial(self) -> bool:
        return self.concat == "partial"

    @property
    def is_final(self) -> bool:
        return self.concat.startswith("final")

    @property
    def shard(self) -> int:
        return shard_of(self.upload_id)

    @property
    def batch_keys(self) -> list[str]:
        """The keys of its batch (BATCH_KINDS) that its completion and removal touch, or []."""
        return keys_of(self.batch, *BATCH_KINDS) if self.batch else []

    def as_event(self, event: EventType, at: float, path: str) -> dict[str, str]:
        """The fields of this upload's event, flat strings as a Redis stream holds them."""
        return {
            "type": event,
            "upload_id": self.upload_id,
            "owner": self.owner,
            "length": "" if self.length is None else str(self.length),
            "offset": str(self.offset),
            "metadata": self.metadata,
            "sha256": self.sha256,
            "path": path,
            "url": self.url,
            "time": f"{at:.3f}",
            "request_id": current_request_id.get(),
        }


def upload_of(upload_id: str, flat: list[Any]) -> Upload:
    """The upload from a script's HGETALL reply (field, value, field, value, ...)."""
    return upload_from_hash(upload_id, dict(zip(flat[::2], flat[1::2], strict=True)))


def upload_from_hash(upload_id: str, raw: Mapping[Any, Any]) -> Upload:
    """The upload from its Redis hash (HGETALL as a mapping)."""
    fields = {as_text(k): as_text(v) for k, v in raw.items()}
    return Upload(
        upload_id=upload_id,
        owner=fields["owner"],
        offset=int(fields["offset"]),
        length=int(fields["length"]) if fields["length"] != "" else None,
        metadata=fields.get("metadata", ""),
        status=cast(UploadStatus, fields["status"]),
        created_at=float(fields["created"]),
        expires_at=float(fields["expires"]) if fields.get("expires") else None,
        url=fields.get("url", ""),
        concat=fields.get("concat", ""),
        sha256=fields.get("sha256", ""),
        created_by=fields.get("creator", ""),
        batch=fields.get("batch", ""),
        batch_path=fields.get("bpath", ""),
        checkpoint_at=float(fields.get("checkpoint") or fields["created"]),
    )


def as_text(value: bytes | str) -> str:
    """A Redis reply value as text."""
    return value.decode() if isinstance(value, bytes) else value


def flat_pairs(mapping: Mapping[str, str]) -> list[str]:
    """`mapping` as [key, value, key, value, ...], as HSET and XADD take it."""
    return [item for pair in mapping.items() for item in pair]
