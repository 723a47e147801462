"""Files a test reads or writes: an upload's file in a data directory, and random content."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tests.support.tus import upload_id_of


def file_of(data_dir: Path, url: str) -> Path:
    """The file holding the upload at `url` (or with that id) under `data_dir`."""
    upload_id = upload_id_of(url)
    return data_dir / "uploads" / upload_id[:2] / upload_id


def random_file(path: Path, size: int) -> bytes:
    """Write `size` random bytes to `path`; the bytes."""
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def distinct_blocks(count: int, size: int) -> Iterator[bytes]:
    """`count` blocks of `size` random bytes, each unlike the others (its index in its first
    8 bytes, so a block lost, repeated or out of order changes the digest): gigabytes of
    content without holding more than one block."""
    block = bytearray(os.urandom(size))
    for index in range(count):
        block[:8] = index.to_bytes(8, "big")
        yield bytes(block)
