"""What scraping /metrics costs an upload (issue 21): the same single-PATCH upload with and
without a scraper that GETs /metrics every `--interval`, against one tusserver, in one run.

    python -m benchmarks.scrape_cost [--bytes 1GiB] [--rounds 5] [--interval 100ms] [--workers 2]

It starts `python -m tusserver --fsync never` (this checkout; the throughput-bound setting, so
any cost would show) with `--workers` processes (2: every scrape reads and sums both workers'
metric files, the dearer path), then runs `--rounds` pairs of uploads: one quiet, one scraped,
their order alternating from pair to pair so a drift of the machine hits both alike, each after
a `--settle` pause (see benchmarks/README.md: freed page-cache memory goes back to the VM's
host). It prints one JSON object: MB/s of every run, the medians, the ratio scraped / quiet
(1.0: no cost) of the medians and of each pair, the server's CPU seconds (its whole process
tree) in every run and their ratio, the number of scrapes, their p50/p99 latency and the size
of one scrape. The machine's noise can exceed any such cost (see benchmarks/README.md), so it
also measures the cost directly: the server's CPU per scrape, `--direct-scrapes` of them back
to back with no upload running, less what the idle server spends meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import client, procstat, servers
from benchmarks.scenarios import percentile
from tusserver.settings import parse_duration, parse_size

WORK = Path(__file__).resolve().parent / ".work" / "scrape-cost"


@dataclass
class Scraper:
    """GET /metrics every `interval_s` until stopped; the latency and size of each."""

    url: str
    interval_s: float
    latencies_ms: list[float] = field(default_factory=list)
    body_bytes: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with client.session() as http:
            while not stop.is_set():
                started = time.perf_counter()
                async with http.get(self.url) as response:
                    text = await response.text()
                if response.status != 200 or "tusserver_bytes_received_total" not in text:
                    raise client.LoadError(f"GET /metrics: {response.status} {text[:200]!r}")
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
                self.body_bytes = len(text.encode())
                left = self.interval_s - (time.perf_counter() - started)
                if left > 0:
                    await asyncio.sleep(left)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the server's process tree: supervisor, workers, Valkey."""
    return sum(procstat.cpu_seconds(process) for process in procstat.process_tree(pid))


@dataclass
class Run:
    mb_per_s: float
    server_cpu_s: float


async def timed_upload(endpoint: str, pid: int, size: int, scraper: Scraper | None) -> Run:
    """One upload of `size` bytes in a single PATCH (scraped meanwhile when `scraper`): MB/s
    from the POST to the PATCH's 204, and the server's CPU seconds meanwhile."""
    cpu_before = tree_cpu_s(pid)
    stop = asyncio.Event()
    scraping = asyncio.create_task(scraper.run(stop)) if scraper is not None else None
    try:
        async with client.session() as http:
            started = time.perf_counter()
            await client.upload(http, endpoint, size, client.Progress())
            elapsed = time.perf_counter() - started
    finally:
        stop.set()
        if scraping is not None:
            await scraping  # a failed scrape fails the run
    return Run(round(size / elapsed / 1e6, 1), round(tree_cpu_s(pid) - cpu_before, 2))


async def scrape_cpu_ms(metrics_url: str, pid: int, count: int) -> dict[str, float]:
    """The server's CPU per scrape, apart from any upload: `count` scrapes back to back on
    one connection, less what the idle server spends in as long (lock renewals, sweeper,
    Valkey); and what scraping every 100 ms costs in share of one core."""
    idle_s = 2.0
    before = tree_cpu_s(pid)
    await asyncio.sleep(idle_s)
    idle_cpu_per_s = (tree_cpu_s(pid) - before) / idle_s
    async with client.session() as http:
        before, started = tree_cpu_s(pid), time.perf_counter()
        for _ in range(count):
            async with http.get(metrics_url) as response:
                await response.read()
                if response.status != 200:
                    raise client.LoadError(f"GET /metrics: {response.status}")
        elapsed = time.perf_counter() - started
    per_scrape_ms = (tree_cpu_s(pid) - before - idle_cpu_per_s * elapsed) / count * 1000
    return {
        "server_cpu_ms_per_scrape": round(per_scrape_ms, 2),
        "core_share_pct_at_10_per_s": round(per_scrape_ms * 10 / 1000 * 100, 2),
    }


async def measure(args: argparse.Namespace, endpoint: str, pid: int) -> dict[str, Any]:
    metrics_url = endpoint.split("/files/")[0] + "/metrics"
    await timed_upload(endpoint, pid, min(args.bytes, 64 * 2**20), None)  # warm up, counters
    direct = await scrape_cpu_ms(metrics_url, pid, args.direct_scrapes)
    quiet: list[Run] = []
    scraped: list[Run] = []
    scraper = Scraper(metrics_url, args.interval)
    for pair in range(args.rounds):
        order = ("quiet", "scraped") if pair % 2 == 0 else ("scraped", "quiet")
        for kind in order:
            await asyncio.sleep(args.settle)
            runs = quiet if kind == "quiet" else scraped
            scraping = scraper if kind == "scraped" else None
            runs.append(await timed_upload(endpoint, pid, args.bytes, scraping))
            print(f"pair {pair + 1}: {kind} {runs[-1]}", file=sys.stderr, flush=True)
    quiet_mb = [run.mb_per_s for run in quiet]
    scraped_mb = [run.mb_per_s for run in scraped]
    quiet_cpu = statistics.median(run.server_cpu_s for run in quiet)
    scraped_cpu = statistics.median(run.server_cpu_s for run in scraped)
    pair_ratios = [round(s / q, 3) for s, q in zip(scraped_mb, quiet_mb, strict=True)]
    return {
        "quiet_mb_per_s": quiet_mb,
        "scraped_mb_per_s": scraped_mb,
        "quiet_median_mb_per_s": statistics.median(quiet_mb),
        "scraped_median_mb_per_s": statistics.median(scraped_mb),
        "ratio_scraped_over_quiet": round(
            statistics.median(scraped_mb) / statistics.median(quiet_mb), 3
        ),
        # each pair ran back to back: its ratio is the least exposed to the machine's drift
        "pair_ratios": pair_ratios,
        "median_pair_ratio": statistics.median(pair_ratios),
        "quiet_server_cpu_s": [run.server_cpu_s for run in quiet],
        "scraped_server_cpu_s": [run.server_cpu_s for run in scraped],
        # None: the quiet uploads cost too little CPU to measure (tiny --bytes)
        "server_cpu_ratio_scraped_over_quiet": (
            round(scraped_cpu / quiet_cpu, 3) if quiet_cpu else None
        ),
        "scrapes": len(scraper.latencies_ms),
        "scrape_p50_ms": percentile(scraper.latencies_ms, 0.50),
        "scrape_p99_ms": percentile(scraper.latencies_ms, 0.99),
        "scrape_bytes": scraper.body_bytes,
        **direct,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", type=parse_size, default=2**30, help="size of each upload")
    parser.add_argument("--rounds", type=int, default=5, help="pairs of uploads")
    parser.add_argument("--interval", type=parse_duration, default=0.1, help="between scrapes")
    parser.add_argument("--workers", type=int, default=2, help="tusserver worker processes")
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before each upload")
    parser.add_argument(
        "--direct-scrapes", type=int, default=500, help="scrapes timed alone for their CPU"
    )
    parser.add_argument("--work-dir", type=Path, default=WORK)
    args = parser.parse_args()
    shutil.rmtree(args.work_dir, ignore_errors=True)
    args.work_dir.mkdir(parents=True)
    target = servers.TARGETS["tusserver"]
    server = servers.start(
        target, args.work_dir / "data", args.work_dir / "server.log",
        workers=args.workers, node_dir=None,
    )  # fmt: skip
    pressure = procstat.PressureWindow()
    try:
        result = asyncio.run(measure(args, server.endpoint, server.pid))
    finally:
        server.stop()
        shutil.rmtree(args.work_dir / "data", ignore_errors=True)
    report = {
        "command": shlex.join(["python", "-m", "benchmarks.scrape_cost", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "target": f"{target.label}, --workers {args.workers}",
        "upload_bytes": args.bytes,
        "interval_s": args.interval,
        "cpu_pressure_pct": pressure.percent(),
        **result,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
