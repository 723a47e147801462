"""Keep the C allocator from handing body memory back to the kernel after every block, and
the cyclic garbage collector from walking every object too often.

aiohttp hands a PATCH body over in new `bytes` of up to 256 KiB; a PATCH holds up to two
blocks of 4 MiB of them (one gathering, one being written). With glibc's defaults, freeing a
block's worth at once shrinks the heap, and the next block faults the same memory back in,
page by page, zeroed by the kernel. Measured on the project's 2-core VM (benchmarks/README.md):
one 2 GiB PATCH spent about a fifth of its kernel time in those faults. Raising the thresholds
keeps that memory for the next block; the heap then stays at its high-water mark (bounded by
the blocks in flight, not by the size of any upload). What lies free between chunks still in
use is handed back every 10 s (`release_free_pages`), or holes would raise that mark over
time.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
from typing import Any

log = logging.getLogger("tusserver")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 2**20  # allocations above this (none in the body path) use mmap
TRIM_THRESHOLD_BYTES = 64 * 2**20  # free memory at the heap's top kept before trimming


# Every this often, the free pages inside the heap go back to the kernel (`release_free_pages`).
RELEASE_INTERVAL_S = 10.0
RELEASE_PAD_BYTES = 16 * 2**20  # free memory left at the heap's top by a release


@functools.cache  # looked up once: a release runs every 10 s
def _glibc_function(name: str, *argtypes: type[ctypes._SimpleCData[Any]]) -> Any | None:
    """The C library's function `name` (returning an int), None where this Python's C
    library has none (musl, macOS: not glibc)."""
    try:
        function = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds for this process (and the workers it forks);
    False where the C library is not glibc (musl, macOS), which is then left as it is."""
    mallopt = _glibc_function("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    done: bool = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and done
    if not done:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return done


# Net allocations of tracked objects (containers) between two passes over the youngest
# generation; Python's default is 700. Every tenth such pass also looks at the middle one,
# and every tenth of those may walk all of them (when the objects allocated since the last
# full pass are a quarter of those it kept). While 2,000 phones connected within a second,
# the default let three full passes run in each server, of 26-144 ms, with every request
# waiting; at 20,000 there were none until the run's end, and the peak RSS grew by 2 MiB
# (benchmarks/README.md, scenario h).
YOUNG_GENERATION_THRESHOLD = 20_000


def tune_collector() -> None:
    """Leave every object alive now (the modules, the app and its routes: some 50,000) out
    of the cyclic collector's passes from here on: they live as long as the process. A
    full pass walks every tracked object while the event loop waits; while 2,000 uploads
    were being created, the longest took 157-187 ms with this against 196-258 ms without
    (benchmarks/README.md, scenario h). Garbage is collected first, so none is kept. Then
    collect less often (YOUNG_GENERATION_THRESHOLD)."""
    gc.collect()
    gc.freeze()
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_GENERATION_THRESHOLD, middle, old)


def release_free_pages() -> bool:
    """Hand back to the kernel every whole free page of the heap, wherever it is, keeping
    RELEASE_PAD_BYTES at its top; False where the C library is not glibc.

    The thresholds above keep freed memory at the heap's top; what they cannot help is the
    free memory between chunks still in use. Bodies of different sizes (aiohttp's chunks,
    the receiving buffers, blocks) freed in another order than they were made leave holes
    the heap never gives back: under 32 uploads at once, one after another, a worker's RSS
    crept from 79 to 106 MiB in 200 s with 12-14 MiB of it in use (benchmarks/README.md).
    A release took 8 ms on a heap of 90 MB."""
    malloc_trim = _glibc_function("malloc_trim", ctypes.c_size_t)
    if malloc_trim is None:
        return False
    malloc_trim(RELEASE_PAD_BYTES)
    return True


async def release_free_pages_forever(interval_s: float = RELEASE_INTERVAL_S) -> None:
    """`release_free_pages` every `interval_s`, until cancelled; where it cannot release
    (not glibc), this ends after the first interval."""
    while True:
        await asyncio.sleep(interval_s)
        if not release_free_pages():
            return
