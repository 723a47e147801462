"""tus-java-client and tus-android-client, replayed: what TusClient, TusUploader and
TusExecutor send, byte for byte where it matters (tus/tus-java-client
src/main/java/io/tus/java/client/TusUploader.java, TusClient.java, TusExecutor.java,
ProtocolException.java; tus/tus-android-client builds on them: TusAndroidUpload.java,
TusPreferencesURLStore.java).

- `resumeOrCreateUpload`: a stored URL is resumed with HEAD (2xx with `Upload-Offset`
  needed); a 404 creates a new upload at once; any other refusal is thrown.
- A PATCH per request payload (10 MiB by default; the example app writes 1 MiB chunks):
  chunked body (`setChunkedStreamingMode(0)`, no Content-Length), `Expect: 100-continue`,
  POST + `X-HTTP-Method-Override: PATCH` on JREs that refuse PATCH. 2xx with the expected
  `Upload-Offset` or a ProtocolException.
- TusExecutor retries a ProtocolException only on 5xx and 423 (delays 0.5, 1, 2, 3 s).
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.support.mobile import java_patch, java_patch_headers
from tests.support.processes import BODY_PEAK_GROWTH_MIB, StartProcess, memory_kib
from tests.support.raw_http import RawRequest
from tests.support.servers import ServerFactory
from tests.support.tus import (
    TUS,
    completed_digest,
    create_upload,
    head,
    head_offset,
    repr_digest_of,
)
from tests.support.waiting import wait_until

DATA = bytes(range(251)) * 9000  # ~2.2 MiB: three requests of 1 MiB payload
PAYLOAD = 1024 * 1024
RETRIED = frozenset({423, *range(500, 600)})  # ProtocolException.shouldRetry


async def resume_or_create(http: aiohttp.ClientSession, endpoint: str, stored: str | None) -> str:
    """TusClient.resumeOrCreateUpload: HEAD the stored URL; create only on 404."""
    if stored is not None:
        answer = await head(http, stored)
        if answer.status == 200:
            assert "Upload-Offset" in answer.headers
            return stored
        assert answer.status == 404, f"tus-java-client would throw on {answer.status}"
    return await create_upload(http, endpoint, len(DATA))


async def upload_rest(url: str, offset: int, *, override: bool) -> int:
    """TusUploader.uploadChunk until done: one chunked PATCH per payload."""
    while offset < len(DATA):
        piece = DATA[offset : offset + PAYLOAD]
        answer = await java_patch(url, offset, piece, {}, override=override)
        assert answer is not None and answer.continued
        assert answer.response.status == 204, answer.response.body
        assert answer.response.status not in RETRIED
        offset += len(piece)
        assert answer.response.headers["upload-offset"] == str(offset)
    return offset


@pytest.mark.parametrize("override", [True, False], ids=["post-override", "patch"])
async def test_upload_interrupted_then_resumed_after_restart(
    endpoint: str, http: aiohttp.ClientSession, override: bool
) -> None:
    url = await resume_or_create(http, endpoint, None)
    # the app dies (or the network drops) 300 KiB into the first request's body
    cut = await java_patch(url, 0, DATA[:PAYLOAD], {}, override=override, stop_after=300 * 1024)
    assert cut is None  # invited (100 Continue), then cut off
    # a new process: the stored URL is resumed where the server says
    resumed = await resume_or_create(http, endpoint, url)
    assert resumed == url
    offset = await head_offset(http, url)
    assert offset <= 300 * 1024
    assert await upload_rest(url, offset, override=override) == len(DATA)
    assert await completed_digest(http, url) == repr_digest_of(DATA)


async def test_refusal_before_the_body_sends_no_100_continue(
    endpoint: str, http: aiohttp.ClientSession
) -> None:
    """409 (wrong offset) and 415 come before `100 Continue`: the body is never invited."""
    url = await create_upload(http, endpoint, len(DATA))
    answer = await java_patch(url, 5, DATA[:PAYLOAD], {}, override=True)
    assert answer is not None and not answer.continued
    assert (answer.response.status, answer.response.headers["upload-offset"]) == (409, "0")
    assert answer.response.status not in RETRIED  # a ProtocolException: the app decides
    assert await head_offset(http, url) == 0


async def test_a_gone_upload_is_404_so_the_client_creates_a_new_one(
    endpoint: str, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, endpoint, len(DATA))
    async with http.delete(url, headers=TUS) as response:
        assert response.status == 204
    fresh = await resume_or_create(http, endpoint, url)  # 410 would throw here
    assert fresh != url
    assert await upload_rest(fresh, 0, override=True) == len(DATA)


async def test_resume_right_after_a_dropped_request_takes_the_upload_over(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    """A takeover ends the older request (it answers 400) and the newer one goes on; a 423
    (the holder did not let go in time) is one of the two statuses TusExecutor retries."""
    server = await make_server()
    url = await create_upload(http, server.url, len(DATA))
    assert await java_patch(url, 0, DATA[:PAYLOAD], {}, override=True, stop_after=64 * 1024) is None

    async def resumed() -> bool:
        offset = await head_offset(http, url)
        answer = await java_patch(url, offset, DATA[offset:], {}, override=True)
        assert answer is not None
        if answer.response.status in RETRIED:
            return False  # TusExecutor waits and tries again
        assert answer.response.status == 204, answer.response.body
        return True

    await wait_until(resumed, timeout_s=20, what="the resumed PATCH went through")
    assert await completed_digest(http, url) == repr_digest_of(DATA)


@pytest.mark.slow
async def test_a_long_chunked_body_through_method_override_streams_in_bounded_memory(
    processes: StartProcess, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """tus-java-client on stock Java: POST + X-HTTP-Method-Override: PATCH, Expect: 100-continue,
    a chunked body of unknown length. 256 MiB go through; the server's peak memory grows by
    a small part of that (its body blocks), not by the body."""
    server = processes(tmp_path / "data", "--fsync", "never")
    total, block = 256 * 2**20, bytes(range(256)) * 256  # 64 KiB, sent again and again
    url = await create_upload(http, server.url, total)
    pid = server.process.pid
    peak_before = memory_kib(pid, "VmHWM")
    method, headers = java_patch_headers(0, {}, override=True)
    request = await RawRequest.start(url, method, headers)
    try:
        assert (await request.response()).status == 100
        frame = f"{len(block):x}\r\n".encode() + block + b"\r\n"
        for _ in range(total // len(block)):
            await request.send(frame)
        await request.send(b"0\r\n\r\n")
        assert (await request.response(timeout_s=60)).status == 204
    finally:
        await request.close()
    assert await head_offset(http, url) == total
    grown_mib = (memory_kib(pid, "VmHWM") - peak_before) / 1024
    assert grown_mib < BODY_PEAK_GROWTH_MIB, f"the peak grew by {grown_mib:.0f} MiB for 256 MiB"
