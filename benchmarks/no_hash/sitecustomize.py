"""Take the SHA-256 of streamed bodies out of tusserver, to measure what everything else costs.

An experiment, never a way to run a server: uploads finish with a digest of 32 zero bytes.
Python imports `sitecustomize` at start from any folder on PYTHONPATH; this one replaces
`hashlib.sha256` so that a hash started empty (how tusserver starts the running hash of an
upload) does no work, while a hash started with data (a small creation's body, HMACs) stays
real. The server keeps every other step: its thread hops, writes, Redis steps and locks.
With the harness:

    python -m benchmarks.run --scenarios a,b,c --targets tusserver,bare-aiohttp --repeat 1 \\
        --server-env PYTHONPATH=benchmarks/no_hash
"""

from __future__ import annotations

import hashlib
from typing import Any

_real_sha256 = hashlib.sha256


class NoHash:
    """Looks like a SHA-256 object; hashes nothing."""

    name = "sha256"
    digest_size = 32
    block_size = 64

    def update(self, data: object, /) -> None:
        pass

    def digest(self) -> bytes:
        return bytes(self.digest_size)

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> NoHash:
        return self


def sha256(data: bytes = b"", **kwargs: Any) -> Any:
    return _real_sha256(data, **kwargs) if data else NoHash()


hashlib.sha256 = sha256  # type: ignore[assignment]  # the point of the experiment
