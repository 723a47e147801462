"""The tuspyserver peer for the benchmark: tuspyserver's FastAPI router, mounted as its README
shows, served by uvicorn in one process on 127.0.0.1.

    python -m benchmarks.tuspy_server --port 0 --data-dir DIR

It binds the socket itself (so port 0 works and the harness learns the port), prints
`listening on http://127.0.0.1:PORT/files/` and serves on that socket until SIGTERM. uvicorn
runs with its defaults (h11 and the asyncio loop unless httptools or uvloop are installed,
an access log line per request), as a user who follows the README gets it.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from tuspyserver import create_tus_router

LISTEN_BACKLOG = 2048  # uvicorn's own default
GRACEFUL_STOP_S = 5  # uvicorn waits for open requests forever unless told otherwise


def build_app(data_dir: Path) -> FastAPI:
    app = FastAPI()
    app.include_router(create_tus_router(files_dir=str(data_dir), prefix="files"))
    return app


def main() -> int:
    parser = argparse.ArgumentParser(prog="tuspy_server", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, required=True)
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(LISTEN_BACKLOG)
    config = uvicorn.Config(
        build_app(args.data_dir), backlog=LISTEN_BACKLOG, timeout_graceful_shutdown=GRACEFUL_STOP_S
    )
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}/files/", flush=True)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
