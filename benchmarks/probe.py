"""The latency probe: HEAD then PATCH on one upload of its own, again and again, while the
harness loads the server (scenario f runs it beside scenario c, h beside the slow clients).

It runs in its own process so the load's event loop does not delay its timings. It prints
`ready` once its upload exists, measures until SIGTERM (or --max-pairs, or --max-s), then
prints one JSON object: the number of HEAD+PATCH pairs, their latencies and those of the
HEADs alone in milliseconds, and the pairs that failed (by kind) with --count-failures.

With --new-connection every pair opens a connection of its own, as a client that comes back
to resume does (so the time to be accepted counts); otherwise one connection is kept alive.

    python -m benchmarks.probe ENDPOINT [--patch-bytes 4096] [--new-connection]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp

from benchmarks import client


@dataclass
class Timings:
    pairs_ms: list[float] = field(default_factory=list)
    heads_ms: list[float] = field(default_factory=list)
    heads_sent_at: list[float] = field(default_factory=list)  # time.monotonic(), system-wide
    failures: Counter[str] = field(default_factory=Counter)


async def _pair(http: aiohttp.ClientSession, url: str, patch_bytes: int, timings: Timings) -> None:
    progress = client.Progress()
    timings.heads_sent_at.append(time.monotonic())
    started = time.perf_counter()
    offset = await client.head(http, url)
    timings.heads_ms.append((time.perf_counter() - started) * 1000)
    await client.patch(http, url, offset, patch_bytes, progress)
    timings.pairs_ms.append((time.perf_counter() - started) * 1000)


async def probe(args: argparse.Namespace) -> Timings:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    timings = Timings()
    async with client.session(connections=1) as http:
        length = args.patch_bytes * (args.max_pairs + 1)  # the last pair does not complete it
        url, _offset = await client.create(http, args.endpoint, length, client.Progress())
        print("ready", flush=True)
        deadline = time.monotonic() + args.max_s
        while not stop.is_set() and len(timings.pairs_ms) < args.max_pairs:
            if time.monotonic() > deadline:
                break
            try:
                async with asyncio.timeout(args.pair_timeout_s):
                    if args.new_connection:
                        async with client.session(connections=1) as fresh:
                            await _pair(fresh, url, args.patch_bytes, timings)
                    else:
                        await _pair(http, url, args.patch_bytes, timings)
            except (client.LoadError, aiohttp.ClientError, OSError, TimeoutError) as error:
                if not args.count_failures:
                    raise
                timings.failures[client.failure_kind(error)] += 1
            if args.interval_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.interval_s)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(prog="probe", description=__doc__)
    parser.add_argument("endpoint")
    parser.add_argument("--patch-bytes", type=int, default=4096)
    parser.add_argument("--max-pairs", type=int, default=200_000)
    parser.add_argument("--max-s", type=float, default=900.0)
    parser.add_argument("--new-connection", action="store_true",
                        help="open a connection for every pair")  # fmt: skip
    parser.add_argument("--interval-s", type=float, default=0.0,
                        help="pause between pairs [default: none]")  # fmt: skip
    parser.add_argument("--pair-timeout-s", type=float, default=300.0)
    parser.add_argument("--count-failures", action="store_true",
                        help="count failed pairs and go on, not exit non-zero")  # fmt: skip
    args = parser.parse_args()
    timings = asyncio.run(probe(args))
    print(json.dumps({"pairs": len(timings.pairs_ms), "latencies_ms": timings.pairs_ms,
                      "head_latencies_ms": timings.heads_ms,
                      "heads_sent_at": timings.heads_sent_at[: len(timings.heads_ms)],
                      "failures": dict(timings.failures)}), flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
