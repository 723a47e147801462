"""The SHA-256 of uploads this process is receiving, kept between requests."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hashlib import _Hash as Hash


class RunningHashes:
    """SHA-256 objects of uploads this process is receiving, each valid at one offset (the
    oldest are forgotten past `capacity`; such an upload is hashed from its file at the end)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._hashes: OrderedDict[str, tuple[int, Hash]] = OrderedDict()
        self._capacity = capacity

    def take(self, upload_id: str, offset: int) -> Hash | None:
        """The hash of bytes [0, offset), or None if this process does not have it."""
        if offset == 0:
            self._hashes.pop(upload_id, None)
            return hashlib.sha256()
        entry = self._hashes.pop(upload_id, None)
        return entry[1] if entry is not None and entry[0] == offset else None

    def keep(self, upload_id: str, offset: int, running: Hash) -> None:
        self._hashes[upload_id] = (offset, running)
        while len(self._hashes) > self._capacity:
            self._hashes.popitem(last=False)
