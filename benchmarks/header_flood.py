"""Strangers holding unfinished header blocks (issue 18): what they cost a tusserver process,
and what a normal request costs meanwhile, against the same requests without them.

    python -m benchmarks.header_flood [--connections 40] [--lines 90] [--requests 200]

It starts `python -m tusserver` (this checkout, development mode, its own data directory under
benchmarks/.work/), measures the latency of GET /health without the flood (the baseline),
opens the connections, each sending `--lines` header lines of ~1000 bytes and never the empty
line that ends the block, measures the same requests again, closes them, and prints one JSON
object: the server process's RSS (MiB) before, during and after, and the p50/p99 latencies
with and without the flood and their ratio. The server's --header-timeout (30 s) is longer
than the run, so every connection is still open while the requests are measured.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / ".work" / "header-flood"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def start_server(data_dir: Path) -> tuple[subprocess.Popen[bytes], int]:
    with open(data_dir.parent / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tusserver", "--port", "0", "--data-dir", str(data_dir)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = (data_dir.parent / "server.log").read_text(errors="replace")
        if "listening on http://" in text:
            port = int(text.split("listening on http://")[1].split("/")[0].rsplit(":", 1)[1])
            return process, port
        if process.poll() is not None:
            raise RuntimeError(f"tusserver exited: {text}")
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("tusserver did not start in 30 s")


def latencies_ms(port: int, count: int) -> list[float]:
    """GET /health on a new connection each time (as a new phone would), in milliseconds."""
    results = []
    for _ in range(count):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if not sock.recv(64).startswith(b"HTTP/1.1 200"):
                raise RuntimeError("GET /health was not answered 200")
        results.append((time.perf_counter() - started) * 1000)
    return results


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=40)
    parser.add_argument("--lines", type=int, default=90, help="header lines of ~1000 bytes each")
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    process, port = start_server(WORK / "data")
    try:
        latencies_ms(port, 20)  # warm up
        before = rss_mib(process.pid)
        quiet = latencies_ms(port, args.requests)
        strangers = []
        for _ in range(args.connections):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            strangers.append(sock)
        for line in range(args.lines):
            for sock in strangers:
                sock.sendall(b"X-Filler-%d: %s\r\n" % (line, b"a" * 980))
        time.sleep(1)  # let the server read what was sent before measuring its memory
        during = rss_mib(process.pid)
        flooded = latencies_ms(port, args.requests)
        for sock in strangers:
            sock.close()
        time.sleep(1)
        after = rss_mib(process.pid)
    finally:
        process.terminate()
        process.wait(30)
    quiet_s, flooded_s = summary(quiet), summary(flooded)
    result = {
        "connections": args.connections,
        "header_bytes_each": args.lines * 1000,
        "rss_mib": {
            "before": round(before, 1),
            "during": round(during, 1),
            "after": round(after, 1),
        },
        "health_without_flood": quiet_s,
        "health_with_flood": flooded_s,
        "p99_ratio_flood_over_quiet": round(flooded_s["p99_ms"] / quiet_s["p99_ms"], 2),
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
