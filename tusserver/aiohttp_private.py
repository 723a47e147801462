"""Every use of aiohttp's private details, in one module.

aiohttp has no public way to take the bytes a failed body stream still buffers, to clear an
error set on that stream, or to keep an interim `100 Continue` out of the response's byte
count. These functions do it through private fields; `tests/test_aiohttp_private.py` fails
the day an aiohttp upgrade renames or changes them, instead of the server quietly losing
bytes or miscounting.
"""

from __future__ import annotations

from aiohttp import StreamReader, web

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def unread_chunks(body: StreamReader) -> list[bytes]:
    """Take the bytes the stream received but had not handed out when it failed. `readany`
    raises a stored error (the client hung up, or an error we set to wake the reader) before
    returning its buffer, yet those bytes did arrive, in order, after what was read."""
    # One chunk at a time, as `readany` takes them, so the stream's byte count and flow
    # control stay right; only the chunks buffered now (taking one may resume reading).
    return [body._read_nowait_chunk(-1) for _ in range(len(body._buffer))]


def clear_error(body: StreamReader) -> None:
    """Forget the error set on the stream (`set_exception`), so aiohttp drains the rest of the
    body after the answer instead of logging our own wake-up signal as unhandled."""
    body._exception = None


async def send_continue(request: web.BaseRequest) -> None:
    """Send `100 Continue` now (after the checks a refusal would come from). The interim
    answer is not part of the response: its bytes are taken off the writer's count, as
    aiohttp's own expect handler does, so the access log's `bytes_out` stays the answer's."""
    writer = request.writer
    await writer.write(CONTINUE)
    writer.output_size = 0
