"""Random ids come from blocks of the kernel's CSPRNG: each byte is handed out once, and a
forked process never hands out what its parent does."""

from __future__ import annotations

import os

from tusserver import randomness


def test_ids_are_hex_of_their_size_and_never_repeat() -> None:
    ids = [randomness.token_hex(16) for _ in range(3 * randomness.BLOCK_BYTES // 16)]
    assert all(len(token) == 32 and int(token, 16) >= 0 for token in ids)
    assert len(set(ids)) == len(ids)  # three blocks' worth: each byte handed out once
    assert len(randomness.token_hex(2 * randomness.BLOCK_BYTES)) == 4 * randomness.BLOCK_BYTES


def test_a_forked_child_draws_other_ids_than_its_parent() -> None:
    randomness.token_hex(8)  # the parent holds a block with bytes left in it
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        try:
            os.write(writing, "".join(randomness.token_hex(8) for _ in range(4)).encode())
        finally:
            os._exit(0)
    os.close(writing)
    child = os.read(reading, 4096).decode()
    os.close(reading)
    os.waitpid(pid, 0)
    parent = "".join(randomness.token_hex(8) for _ in range(4))
    assert len(child) == len(parent) == 64
    assert child != parent
