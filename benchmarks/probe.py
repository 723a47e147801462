"""The latency probe: HEAD then PATCH on one upload of its own, again and again, while the
harness loads the server (scenario f runs it beside scenario c).

It runs in its own process so the load's event loop does not delay its timings. It prints
`ready` once its upload exists, measures until SIGTERM (or --max-pairs, or --max-s), then
prints one JSON object: the number of HEAD+PATCH pairs and their latencies in milliseconds.

    python -m benchmarks.probe ENDPOINT [--patch-bytes 4096]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time

from benchmarks import client


async def probe(endpoint: str, patch_bytes: int, max_pairs: int, max_s: float) -> list[float]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    latencies_ms: list[float] = []
    progress = client.Progress()
    async with client.session(connections=1) as http:
        url, offset = await client.create(http, endpoint, patch_bytes * max_pairs, progress)
        print("ready", flush=True)
        deadline = time.monotonic() + max_s
        while not stop.is_set() and len(latencies_ms) < max_pairs:
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            offset = await client.head(http, url)
            offset = await client.patch(http, url, offset, patch_bytes, progress)
            latencies_ms.append((time.perf_counter() - started) * 1000)
    return latencies_ms


def main() -> int:
    parser = argparse.ArgumentParser(prog="probe", description=__doc__)
    parser.add_argument("endpoint")
    parser.add_argument("--patch-bytes", type=int, default=4096)
    parser.add_argument("--max-pairs", type=int, default=200_000)
    parser.add_argument("--max-s", type=float, default=900.0)
    args = parser.parse_args()
    latencies = asyncio.run(probe(args.endpoint, args.patch_bytes, args.max_pairs, args.max_s))
    print(json.dumps({"pairs": len(latencies), "latencies_ms": latencies}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
