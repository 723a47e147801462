"""Keep the C allocator from handing body memory back to the kernel after every block, and
the cyclic garbage collector from walking every object too often.

aiohttp hands a PATCH body over in new `bytes` of up to 256 KiB; a PATCH holds up to two
blocks of 4 MiB of them (one gathering, one being written). With glibc's defaults, freeing a
block's worth at once shrinks the heap, and the next block faults the same memory back in,
page by page, zeroed by the kernel. Measured on the project's 2-core VM (benchmarks/README.md):
one 2 GiB PATCH spent about a fifth of its kernel time in those faults. Raising the thresholds
keeps that memory for the next block; the heap then stays at its high-water mark (bounded by
the blocks in flight, not by the size of any upload).
"""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger("tusserver")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 2**20  # allocations above this (none in the body path) use mmap
TRIM_THRESHOLD_BYTES = 64 * 2**20  # free memory at the heap's top kept before trimming


def tune_malloc() -> bool:
    """Set glibc's mmap and trim thresholds for this process (and the workers it forks);
    False where the C library is not glibc (musl, macOS), which is then left as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this Python runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
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
