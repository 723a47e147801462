"""The bare aiohttp append handler: the ceiling of tusserver's stack (aiohttp on asyncio).

It answers the few requests the harness sends, as plainly as aiohttp allows: POST creates a
file (and appends a body sent with it), PATCH appends its body when Upload-Offset equals the
file's size, HEAD answers the file's size, DELETE removes the file. No Redis, no lock, no
hash, no fsync, no middleware: each chunk aiohttp hands over is written straight to the file
from the event loop.
The file itself is the only state, so `--workers N` processes can share one listening socket.

    python -m benchmarks.bare_append --port 0 --data-dir DIR [--workers N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import socket
import sys
from pathlib import Path

from aiohttp import StreamReader, web

DATA_DIR = web.AppKey("data_dir", Path)
READ_BUFFER_BYTES = 256 * 1024  # the same socket read size tusserver uses


def _path(request: web.Request) -> Path:
    upload_id = request.match_info["upload_id"]
    if not upload_id.isalnum():
        raise web.HTTPNotFound()
    return request.app[DATA_DIR] / upload_id


async def _append(fd: int, body: StreamReader) -> None:
    while chunk := await body.readany():
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]


async def create(request: web.Request) -> web.Response:
    upload_id = secrets.token_hex(16)
    path = request.app[DATA_DIR] / upload_id
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_APPEND, 0o600)
    try:
        if request.body_exists:
            await _append(fd, request.content)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    location = f"{request.scheme}://{request.host}/files/{upload_id}"
    headers = {"Location": location, "Upload-Offset": str(size), "Tus-Resumable": "1.0.0"}
    return web.Response(status=201, headers=headers)


async def append(request: web.Request) -> web.Response:
    try:
        fd = os.open(_path(request), os.O_WRONLY | os.O_APPEND)
    except FileNotFoundError:
        raise web.HTTPNotFound() from None
    try:
        size = os.fstat(fd).st_size
        if request.headers.get("Upload-Offset") != str(size):
            return web.Response(status=409, headers={"Upload-Offset": str(size)})
        await _append(fd, request.content)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return web.Response(status=204, headers={"Upload-Offset": str(size), "Tus-Resumable": "1.0.0"})


async def offset(request: web.Request) -> web.Response:
    try:
        size = _path(request).stat().st_size
    except FileNotFoundError:
        raise web.HTTPNotFound() from None
    return web.Response(status=200, headers={"Upload-Offset": str(size), "Tus-Resumable": "1.0.0"})


async def delete(request: web.Request) -> web.Response:
    try:
        _path(request).unlink()
    except FileNotFoundError:
        raise web.HTTPNotFound() from None
    return web.Response(status=204, headers={"Tus-Resumable": "1.0.0"})


def build_app(data_dir: Path) -> web.Application:
    app = web.Application(handler_args={"read_bufsize": READ_BUFFER_BYTES})
    app[DATA_DIR] = data_dir
    app.router.add_post("/files/", create)
    app.router.add_patch("/files/{upload_id}", append)
    app.router.add_head("/files/{upload_id}", offset)
    app.router.add_delete("/files/{upload_id}", delete)
    return app


async def serve(data_dir: Path, sock: socket.socket) -> None:
    """Serve on `sock` until SIGTERM or SIGINT."""
    runner = web.AppRunner(build_app(data_dir), handle_signals=False, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(prog="bare_append", description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    args.data_dir.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}/files/", flush=True)
    if args.workers == 1:
        asyncio.run(serve(args.data_dir, sock))
        return 0
    children = []
    for _ in range(args.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                asyncio.run(serve(args.data_dir, sock))
                code = 0
            finally:
                os._exit(code)
        children.append(pid)

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for child in children:
        os.waitpid(child, 0)  # retried after a signal (PEP 475)
    return 0


if __name__ == "__main__":
    sys.exit(main())
