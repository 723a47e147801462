"""An event of the outbox as delivery reads it, and the JSON body the parent's webhook gets
(docs/events.md): an upload's event, or a batch's."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tusserver import protocol
from tusserver.errors import TusError
from tusserver.events.parent import json_bytes
from tusserver.store.records import as_text


def _stored_metadata_text(raw: str) -> dict[str, str | None]:
    try:
        return protocol.metadata_text(protocol.parse_metadata(raw))
    except TusError:  # stored metadata was parsed once already; never fail an event on it
        return {}


@dataclass(frozen=True)
class Entry:
    """One event of a shard's stream, as read for delivery."""

    shard: int
    stream_id: str
    fields: Mapping[str, str]

    @property
    def event_id(self) -> str:
        """Unique across shards, stable across retries and restarts: the parent dedups on it."""
        return f"{self.shard}:{self.stream_id}"

    def age_s(self, now: float) -> float:
        """Seconds since the event was written (stream ids start with Redis's clock in ms)."""
        return now - int(self.stream_id.split("-")[0]) / 1000

    def body(self) -> bytes:
        """The JSON the webhook receives; the same bytes at every try."""
        fields = self.fields
        if fields.get("type", "").startswith("batch."):
            return self._batch_body()
        length = fields.get("length", "")
        return json_bytes(
            {
                "id": self.event_id,
                "shard": self.shard,
                "stream_id": self.stream_id,
                "type": fields.get("type", ""),
                "upload_id": fields.get("upload_id", ""),
                "owner": fields.get("owner", ""),
                "length": int(length) if length.isdigit() else None,
                "offset": int(fields.get("offset") or 0),
                "metadata": _stored_metadata_text(fields.get("metadata", "")),
                "upload_metadata": fields.get("metadata", ""),
                "sha256": fields.get("sha256") or None,
                "path": fields.get("path", ""),
                "url": fields.get("url", ""),
                "time": float(fields.get("time") or 0),
                "request_id": fields.get("request_id") or None,
            }
        )

    def _batch_body(self) -> bytes:
        """A batch's event: `batch.completed` lists every member with its length, SHA-256
        and metadata; `batch.terminated` and `batch.expired` the ids and paths it had."""
        fields = self.fields
        files, total = fields.get("files", ""), fields.get("bytes", "")
        body: dict[str, object] = {
            "id": self.event_id,
            "shard": self.shard,
            "stream_id": self.stream_id,
            "type": fields.get("type", ""),
            "batch": fields.get("batch", ""),
            "owner": fields.get("owner", ""),
            "url": fields.get("url", ""),
        }
        if fields.get("type") == "batch.completed":
            body |= {
                "files": int(files) if files.isdigit() else 0,
                "bytes": int(total) if total.isdigit() else 0,
                "metadata": _stored_metadata_text(fields.get("metadata", "")),
                "batch_metadata": fields.get("metadata", ""),
            }
        members = [_member(member) for member in json.loads(fields.get("members") or "[]")]
        body |= {
            "members": sorted(members, key=lambda member: str(member["path"])),
            "time": float(fields.get("time") or 0),
            "request_id": fields.get("request_id") or None,
        }
        return json_bytes(body)


def _member(stored: Mapping[str, str]) -> dict[str, object]:
    """A batch member as its event shows it (`lua.batch_member_done` stores strings)."""
    member: dict[str, object] = {"id": stored.get("id", ""), "path": stored.get("path", "")}
    if "sha256" in stored:  # a completed member
        length = str(stored.get("length", ""))
        member |= {
            "length": int(length) if length.isdigit() else None,
            "sha256": stored.get("sha256") or None,
            "metadata": _stored_metadata_text(stored.get("metadata", "")),
            "upload_metadata": stored.get("metadata", ""),
            "url": stored.get("url", ""),
        }
    return member


def entries_of(shard: int, rows: Sequence[Any]) -> list[Entry]:
    """The entries of an XREADGROUP/XAUTOCLAIM reply's rows (deleted ones left out)."""
    return [
        Entry(shard, as_text(stream_id), {as_text(k): as_text(v) for k, v in fields.items()})
        for stream_id, fields in rows
        if stream_id is not None and fields
    ]
