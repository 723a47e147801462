"""Random ids (uploads, requests, lock holders, batches, consumers) from the kernel's CSPRNG,
fetched 4 KiB at a time.

`secrets.token_hex` asks the kernel on every call, and a creation asks three times (its
request id, its upload id, its file's nonce), a PATCH once (its lock's holder): one system
call each on the event loop. Here the kernel's bytes are fetched in blocks and each one is
handed out once. A forked worker forgets the block it inherited, so no two processes hand
out the same bytes.
"""

from __future__ import annotations

import os
import threading

BLOCK_BYTES = 4096


class _RandomBytes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._block = b""
        self._used = 0

    def take(self, size: int) -> bytes:
        with self._lock:
            if self._used + size > len(self._block):
                self._block, self._used = os.urandom(max(BLOCK_BYTES, size)), 0
            start = self._used
            self._used += size
            return self._block[start : self._used]

    def forget(self) -> None:
        """(in a forked child) Never hand out what the parent may hand out too."""
        self._lock = threading.Lock()  # the parent's may have been held by another thread
        self._block, self._used = b"", 0


_random_bytes = _RandomBytes()
os.register_at_fork(after_in_child=_random_bytes.forget)


def token_hex(size: int) -> str:
    """`size` random bytes as hex, as `secrets.token_hex` gives them."""
    return _random_bytes.take(size).hex()
