"""Another tus server, for clients that must work with servers other than tusserver:
aiohttp-tus (a small tus 1.0.0 server on aiohttp, from PyPI), which has no batches.

`python -m tests.support.other_tus_server PORT UPLOAD_DIR` serves the endpoint `/uploads` on
127.0.0.1:PORT and stores each finished file as UPLOAD_DIR/<its filename metadata>.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp_tus import setup_tus

from tests.support.processes import free_port
from tests.support.waiting import wait_until_sync

ANNOUNCED = "Running on http://127.0.0.1:"


@dataclass(frozen=True)
class OtherTusServer:
    url: str  # the endpoint, without a trailing slash (aiohttp-tus routes it so)
    upload_dir: Path
    log_path: Path


def other_tus_server(tmp_path: Path) -> Iterator[OtherTusServer]:
    """Run aiohttp-tus in a subprocess on a free port until the caller is done; killed by pid."""
    port = free_port()
    upload_dir, log_path = tmp_path / "other-uploads", tmp_path / "other-tus-server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.other_tus_server", str(port), str(upload_dir)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_until_sync(
            lambda: ANNOUNCED in log_path.read_text() or process.poll() is not None,
            30,
            what="aiohttp-tus to listen",
        )
        assert process.poll() is None, log_path.read_text()
        yield OtherTusServer(f"http://127.0.0.1:{port}/uploads", upload_dir, log_path)
    finally:
        process.kill()
        process.wait()


def main(argv: list[str]) -> None:
    port, upload_dir = int(argv[0]), Path(argv[1])
    upload_dir.mkdir(parents=True, exist_ok=True)
    app = setup_tus(web.Application(), upload_path=upload_dir, upload_url="/uploads")
    web.run_app(app, host="127.0.0.1", port=port, print=lambda text: print(text, flush=True))


if __name__ == "__main__":
    main(sys.argv[1:])
