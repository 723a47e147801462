"""Requests exactly as the mobile tus clients send them, on plain sockets where a high-level
client would hide a detail that matters (chunked bodies, `Expect: 100-continue`, method
override). Each function names the client source it was read from; tests/test_clients_*.py
replay whole sequences with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.raw_http import RawRequest, RawResponse
from tests.support.tus import OFFSET_STREAM, TUS
from tests.support.waiting import wait_until

# HttpURLConnection.setChunkedStreamingMode(0) uses the JDK's default chunk length, 4096
# bytes (sun.net.www.protocol.http.HttpURLConnection.DEFAULT_CHUNK_SIZE).
JAVA_CHUNK_BYTES = 4096


@dataclass
class ContinuedResponse:
    """The answer to a request that asked `Expect: 100-continue`: whether the server invited
    the body (100 Continue) before its final answer."""

    continued: bool
    response: RawResponse


def java_patch_headers(
    offset: int, extra: Mapping[str, str], *, override: bool
) -> tuple[str, dict[str, str]]:
    """tus-java-client's PATCH (TusUploader.openConnection, src/main/java/io/tus/java/client/
    TusUploader.java): the client's headers (Tus-Resumable and its own, prepareConnection),
    Upload-Offset, the offset stream type, `Expect: 100-continue`, a chunked body with no
    Content-Length (setChunkedStreamingMode(0)); POST with `X-HTTP-Method-Override: PATCH`
    on JREs whose HttpURLConnection refuses PATCH (stock Java; Android's accepts it)."""
    headers = {
        **TUS,
        **extra,
        "Upload-Offset": str(offset),
        "Content-Type": OFFSET_STREAM,
        "Expect": "100-continue",
        "Transfer-Encoding": "chunked",
    }
    if override:
        headers["X-HTTP-Method-Override"] = "PATCH"
    return ("POST" if override else "PATCH"), headers


def chunked(data: bytes, chunk_bytes: int = JAVA_CHUNK_BYTES) -> bytes:
    """`data` in HTTP/1.1 chunked transfer coding, `chunk_bytes` per chunk, with the last
    (empty) chunk."""
    pieces = [
        f"{len(data[i : i + chunk_bytes]):x}\r\n".encode() + data[i : i + chunk_bytes] + b"\r\n"
        for i in range(0, len(data), chunk_bytes)
    ]
    return b"".join(pieces) + b"0\r\n\r\n"


async def java_patch(
    url: str,
    offset: int,
    data: bytes,
    extra: Mapping[str, str],
    *,
    override: bool,
    stop_after: int | None = None,
) -> ContinuedResponse | None:
    """Send one tus-java-client PATCH of `data` at `offset`: the headers, then the chunked
    body only once the server answered 100 Continue (a refusal before the body comes back
    with `continued` False and no body sent). `stop_after`: the connection drops after that
    many body bytes (an app killed or a network lost mid-request); None is returned then."""
    method, headers = java_patch_headers(offset, extra, override=override)
    request = await RawRequest.start(url, method, headers)
    try:
        first = await request.response()
        if first.status != 100:
            return ContinuedResponse(False, first)
        if stop_after is not None:
            body = chunked(data[:stop_after])
            await request.send(body[: -len(b"0\r\n\r\n")])  # no last chunk: cut off
            await wait_until(request.is_read_by_server, what="the server read the cut body")
            return None
        await request.send(chunked(data))
        return ContinuedResponse(True, await request.response(timeout_s=30))
    finally:
        await request.close()


WORKER_COUNTS = ["one-process", "two-workers"]  # pytest ids of the `endpoint` fixtures


async def endpoint_for(
    kind: str,
    make_server: Callable[..., Awaitable[Any]],
    processes: Callable[..., Any],
    data_dir: Path,
) -> str:
    """The tus endpoint of a server in this process (`one-process`) or of `tusserver
    --workers 2` in a subprocess (`two-workers`): the replays run against both."""
    if kind == "two-workers":
        return str((await asyncio.to_thread(processes, data_dir, "--workers", "2")).url)
    return str((await make_server()).url)
