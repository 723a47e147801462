"""Time tusserver's Redis steps and file operations inside a running server, for profiling.

Python imports `sitecustomize` at start from any folder on PYTHONPATH, so this file wraps
the async methods named below before tusserver starts. Every second, each server process
(workers too) writes `<pid>.json` to BENCH_CALL_TIMING_DIR: per method, its count and
p50/p99/max in milliseconds. It changes no behaviour; the wrapping costs a few microseconds
per call. With the harness (which passes no TUS_* variable to servers, hence the name):

    python -m benchmarks.run --scenarios c --targets tusserver --repeat 1 \\
        --server-env PYTHONPATH=benchmarks/call_timing \\
        --server-env BENCH_CALL_TIMING_DIR=benchmarks/.work/timing
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

TIMED = {
    "tusserver.store.state:UploadState": (
        "acquire", "read", "commit", "renew", "create", "release", "declare_length",
    ),
    "tusserver.files.storage:Storage": (
        "open_for_append", "create_for_append", "create_holding", "append_holding",
    ),
    "tusserver.files.storage:UploadFile": ("write", "close", "sync", "truncate"),
}  # fmt: skip
DUMP_INTERVAL_S = 1.0

_durations: defaultdict[str, list[float]] = defaultdict(list)


def _timed(name: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(method)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            _durations[name].append(time.perf_counter() - started)

    return timed


def _install() -> None:
    import importlib
    import sys

    # `python -m tusserver` imports the package of its working directory (the checkout the
    # harness runs from), but that folder joins sys.path only after this file ran: without
    # this line a second checkout would be timed with the installed package's code.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())

    for where, names in TIMED.items():
        module_name, class_name = where.split(":")
        cls = getattr(importlib.import_module(module_name), class_name)
        for name in names:
            setattr(cls, name, _timed(f"{class_name}.{name}", getattr(cls, name)))


def summary() -> dict[str, dict[str, float]]:
    """Per timed method: its count and p50/p99/max in milliseconds."""
    out: dict[str, dict[str, float]] = {}
    for name, values in list(_durations.items()):
        ordered = sorted(values)
        if ordered:
            out[name] = {
                "n": len(ordered),
                "p50_ms": round(1000 * ordered[len(ordered) // 2], 3),
                "p99_ms": round(1000 * ordered[int(len(ordered) * 0.99)], 3),
                "max_ms": round(1000 * ordered[-1], 3),
            }
    return out


def _dump(folder: Path) -> None:
    if _durations:
        path = folder / f"{os.getpid()}.json"
        path.with_suffix(".tmp").write_text(json.dumps(summary(), indent=1, sort_keys=True))
        path.with_suffix(".tmp").replace(path)


def _dump_forever(folder: Path) -> None:
    while True:
        time.sleep(DUMP_INTERVAL_S)
        _dump(folder)


def _start_dumping(folder: Path) -> None:
    threading.Thread(target=_dump_forever, args=(folder,), daemon=True).start()


def _after_fork(folder: Path) -> None:
    _durations.clear()  # a worker reports its own calls, not its parent's
    _start_dumping(folder)


_folder = os.environ.get("BENCH_CALL_TIMING_DIR")
if _folder:
    _target = Path(_folder)
    _target.mkdir(parents=True, exist_ok=True)
    _install()
    _start_dumping(_target)
    os.register_at_fork(after_in_child=functools.partial(_after_fork, _target))
    atexit.register(_dump, _target)
