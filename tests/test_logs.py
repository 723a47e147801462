"""The process's log handler: lines logged on an event loop are written once per loop turn, in
the order they were logged; lines from other threads, and a flush, write at once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from tusserver.http.access_log import AccessLogger, JsonAccessLogger
from tusserver.server.logs import TEXT_FORMAT, TurnBatchedHandler, _Formatter


class CountingStream(io.StringIO):
    """A text stream that counts the writes it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def logged() -> Iterator[tuple[logging.Logger, CountingStream, TurnBatchedHandler]]:
    stream = CountingStream()
    handler = TurnBatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    logger = logging.getLogger("tusserver.test-logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


async def test_one_turns_lines_are_written_together_at_its_end(
    logged: tuple[logging.Logger, CountingStream, TurnBatchedHandler],
) -> None:
    logger, stream, _ = logged
    for number in range(50):
        logger.info("line %d", number)
    assert stream.writes == 0  # the turn has not ended
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.writes == 1
    expected = "".join(f"tusserver.test-logs line {number}\n" for number in range(50))
    assert stream.getvalue() == expected


async def test_a_line_from_another_thread_comes_after_the_waiting_ones(
    logged: tuple[logging.Logger, CountingStream, TurnBatchedHandler],
) -> None:
    logger, stream, _ = logged
    logger.info("on the loop")
    thread = threading.Thread(target=logger.info, args=("from a thread",))
    thread.start()
    thread.join()
    assert stream.getvalue().splitlines() == [
        "tusserver.test-logs on the loop",
        "tusserver.test-logs from a thread",
    ]
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.getvalue().count("on the loop") == 1  # the turn's end wrote nothing again


async def test_flush_writes_what_waits_for_the_turns_end(
    logged: tuple[logging.Logger, CountingStream, TurnBatchedHandler],
) -> None:
    logger, stream, handler = logged
    logger.info("before an exit")
    handler.flush()  # as logging.shutdown does before a worker's os._exit
    assert stream.getvalue() == "tusserver.test-logs before an exit\n"


def _what_a_forked_child_writes(handler: TurnBatchedHandler, stream: CountingStream) -> str:
    """Fork; the child flushes `handler` and tells what its copy of `stream` then holds."""
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            handler.flush()
            os.write(writing, stream.getvalue().encode())
        finally:
            os._exit(0)
    os.close(writing)
    with os.fdopen(reading, "rb") as pipe:
        written = pipe.read().decode()
    os.waitpid(pid, 0)
    return written


async def test_a_forked_child_leaves_the_waiting_lines_to_its_parent(
    logged: tuple[logging.Logger, CountingStream, TurnBatchedHandler],
) -> None:
    logger, stream, handler = logged
    logger.info("logged before the fork")
    assert _what_a_forked_child_writes(handler, stream) == ""
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert stream.getvalue() == "tusserver.test-logs logged before the fork\n"


def test_without_a_loop_every_line_is_written_at_once(
    logged: tuple[logging.Logger, CountingStream, TurnBatchedHandler],
) -> None:
    logger, stream, _ = logged
    logger.info("first")
    logger.info("second")
    assert stream.writes == 2
    assert stream.getvalue() == "tusserver.test-logs first\ntusserver.test-logs second\n"


def test_a_worker_exiting_writes_its_last_lines() -> None:
    """A line still waiting for its loop turn's end when the process calls `logging.shutdown`
    and `os._exit` (as a worker ends) is written."""
    program = (
        "import asyncio, logging, os, sys\n"
        "from tusserver.server import logs\n"
        "logs.setup(json_lines=False, stream=sys.stderr)\n"
        "async def main():\n"
        "    logging.getLogger('tusserver').info('the last line')\n"
        "    logging.shutdown()\n"
        "    os._exit(0)\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stderr.endswith(" tusserver the last line\n")


def test_the_time_is_formatted_as_logging_formats_it() -> None:
    record = logging.LogRecord("x", logging.INFO, "", 0, "message", None, None)
    for created in (1_780_000_000.0, 1_780_000_000.5, 1_780_000_001.25, 1_780_000_000.999):
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert _Formatter(TEXT_FORMAT).format(record) == logging.Formatter(TEXT_FORMAT).format(
            record
        )
        cached = _Formatter(TEXT_FORMAT)
        cached.format(record)
        assert cached.format(record) == logging.Formatter(TEXT_FORMAT).format(record)


def test_access_lines_are_never_percent_formatted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="aiohttp.access")
    request = make_mocked_request("HEAD", "/files/a%25s%(x)s")
    response = web.Response(status=404)
    JsonAccessLogger(logging.getLogger("aiohttp.access"), "").log(request, response, 0.002)
    AccessLogger(logging.getLogger("aiohttp.access"), "").log(request, response, 0.002)
    json_line, text_line = (record.getMessage() for record in caplog.records)
    assert json.loads(json_line)["path"] == request.path
    assert json.loads(json_line)["status"] == 404
    assert text_line.startswith(f"HEAD {request.path} 404 in=0 out=0 2.0ms")
