"""--fsync, seen from the system calls: with `always` the bytes of a PATCH reach the disk
(fdatasync of the upload's file, after its last write) before the commit that announces them
is sent to Redis; the commit that completes the upload, and a creation, are in the embedded
Valkey's AOF, fdatasynced by tusserver itself (Valkey runs `appendfsync no`: store/aof.py),
before the client gets its 204 or 201, while one between checkpoints (--offset-checkpoint)
stays out of the AOF; with `never` the upload's file is never synced.

The server runs under strace (-f: every thread; -y: each fd's path), so this is what the
kernel was asked to do, in order; no hook inside tusserver.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.support.processes import listening_url
from tests.support.tools import has_tool, require_tool
from tests.support.tus import TUS, patch_headers
from tusserver.store import lua

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="strace is Linux only")

TRACED = "pwrite64,pwritev,fdatasync,fsync,write,sendto,sendmsg"


@dataclass
class Traced:
    strace: subprocess.Popen[bytes]
    url: str
    trace_path: Path
    data_dir: Path

    def stop(self) -> list[str]:
        """Stop the server (SIGTERM to strace's child), wait for strace; the trace's lines."""
        if self.strace.poll() is None:
            tasks = Path(f"/proc/{self.strace.pid}/task/{self.strace.pid}/children")
            for pid in tasks.read_text().split():
                os.kill(int(pid), signal.SIGTERM)
            self.strace.wait(30)
        return self.trace_path.read_text(errors="replace").splitlines()


@pytest.fixture
def traced_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Traced]:
    require_tool(has_tool("strace"), "strace is not installed (.ci/install-tools.sh installs it)")
    fsync = request.param
    data_dir, log_path, trace_path = tmp_path / "data", tmp_path / "log", tmp_path / "trace"
    with open(log_path, "wb") as log:
        strace = subprocess.Popen(
            ["strace", "-f", "-qq", "-y", "-s", "1000", "-e", f"trace={TRACED}",
             "-o", str(trace_path), sys.executable, "-m", "tusserver", "--host", "127.0.0.1",
             "--port", "0", "--data-dir", str(data_dir), "--fsync", fsync],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    traced: Traced | None = None
    try:
        traced = Traced(strace, listening_url(strace, log_path, 60), trace_path, data_dir)
        yield traced
    finally:
        try:
            if traced is not None:
                traced.stop()
        finally:
            if strace.poll() is None:
                strace.kill()
                strace.wait()


def _finished_at(lines: list[str], start: int) -> int:
    """The line on which the call begun on `lines[start]` returned."""
    if "<unfinished ...>" not in lines[start]:
        return start
    pid = lines[start].split()[0]
    for index in range(start + 1, len(lines)):
        if lines[index].startswith(pid + " ") and "resumed>" in lines[index]:
            return index
    raise AssertionError(f"no return for: {lines[start]}")


async def _upload_in_two_patches(traced: Traced) -> str:
    """Create an upload of 10 bytes and send it in two PATCHes; its id."""
    async with aiohttp.ClientSession() as http:
        headers = {**TUS, "Upload-Length": "10"}
        async with http.post(traced.url, headers=headers) as response:
            assert response.status == 201, await response.text()
            url = response.headers["Location"]
        for offset, body in ((0, b"first"), (5, b"again")):
            async with http.patch(url, data=body, headers=patch_headers(offset)) as response:
                assert response.status == 204, await response.text()
    return url.rstrip("/").rsplit("/", 1)[1]


@pytest.mark.parametrize("traced_server", ["always"], indirect=True)
async def test_fsync_always_syncs_each_patch_before_its_commit(traced_server: Traced) -> None:
    upload_id = await _upload_in_two_patches(traced_server)
    lines = await asyncio.to_thread(traced_server.stop)
    commit_sha = hashlib.sha1(lua.COMMIT.encode(), usedforsecurity=False).hexdigest()  # its name

    def where(call: str) -> list[int]:
        return [i for i, line in enumerate(lines) if f" {call}(" in line and upload_id in line]

    writes = sorted(where("pwrite64") + where("pwritev"))
    syncs = [_finished_at(lines, i) for i in where("fdatasync") + where("fsync")]
    # (redis-py resends a script Valkey has not cached yet: a commit may appear twice)
    commits = [i for i, line in enumerate(lines) if commit_sha in line and upload_id in line]
    aof_syncs = [
        _finished_at(lines, i)
        for i, line in enumerate(lines)
        if " fdatasync(" in line and "appendonly" in line
    ]
    answers = [i for i, line in enumerate(lines) if "HTTP/1.1 204" in line]
    aof_offsets = [
        i
        for i, line in enumerate(lines)
        if " write(" in line and "appendonly" in line and upload_id in line and "offset" in line
    ]
    assert len(writes) == 2 and len(answers) == 2, (writes, answers)
    for number, (write, answer) in enumerate(zip(writes, answers, strict=True)):
        commit = min(i for i in commits if i > write)
        assert commit < answer
        # the bytes are on disk before the commit is sent ...
        assert any(write < sync < commit for sync in syncs), (write, syncs, commit)
        if number == 1:
            # ... and the completing commit is in the fsynced AOF before the client hears 204
            assert any(commit < sync < answer for sync in aof_syncs), (commit, aof_syncs)
            assert any(commit < w < answer for w in aof_offsets), (commit, aof_offsets)
        else:  # the first is not a checkpoint: it waits for no AOF write or fsync
            assert not any(commit < w < answer for w in aof_offsets), (commit, aof_offsets)


@pytest.mark.parametrize("traced_server", ["always", "complete"], indirect=True)
async def test_a_creation_is_in_the_aof_synced_by_tusserver_before_its_201(
    traced_server: Traced,
) -> None:
    """Valkey writes the creation to its AOF and answers; a thread of tusserver, not Valkey,
    fdatasyncs that file before the 201 goes out, and Valkey syncs nothing meanwhile."""
    async with aiohttp.ClientSession() as http:
        async with http.post(traced_server.url, headers={**TUS, "Upload-Length": "10"}) as made:
            assert made.status == 201, await made.text()
            upload_id = made.headers["Location"].rstrip("/").rsplit("/", 1)[1]
    valkey_pid = int((traced_server.data_dir / "redis" / "valkey.pid").read_text())
    valkey_threads = set(os.listdir(f"/proc/{valkey_pid}/task"))
    lines = await asyncio.to_thread(traced_server.stop)
    answer = next(i for i, line in enumerate(lines) if "HTTP/1.1 201" in line)
    stored = next(
        i
        for i, line in enumerate(lines)
        if " write(" in line and ".incr.aof" in line and upload_id in line
    )
    aof_syncs = [
        (i, _finished_at(lines, i))
        for i, line in enumerate(lines[:answer])
        if ("fdatasync(" in line or "fsync(" in line) and ".incr.aof" in line
    ]
    assert lines[stored].split()[0] in valkey_threads  # Valkey wrote it (its main thread)
    assert any(stored < began and done < answer for began, done in aof_syncs), aof_syncs
    by_valkey = [lines[i] for i, _ in aof_syncs if lines[i].split()[0] in valkey_threads]
    assert by_valkey == []


@pytest.mark.parametrize("traced_server", ["never"], indirect=True)
async def test_fsync_never_does_not_sync_the_upload(traced_server: Traced) -> None:
    upload_id = await _upload_in_two_patches(traced_server)
    lines = await asyncio.to_thread(traced_server.stop)
    writes = [line for line in lines if " pwrite64(" in line and upload_id in line]
    syncs = [line for line in lines if "sync(" in line and upload_id in line]
    assert len(writes) == 2 and syncs == [], (writes, syncs)


def _resp_strings(line: str) -> list[bytes]:
    """The bulk strings of the Redis command that a traced write/sendto line carries (as far
    as strace printed it)."""
    quoted = line.split('"', 1)[1].rsplit('"', 1)[0]
    raw: bytes = codecs.escape_decode(quoted.encode())[0]
    parts = raw.split(b"\r\n")
    return [parts[i + 1] for i, part in enumerate(parts[:-1]) if part.startswith(b"$")]


PWRITE = re.compile(r" pwrite64\(\d+<[^>]*>, .*, (\d+), (\d+)\)")


@pytest.mark.parametrize("traced_server", ["always"], indirect=True)
async def test_fsync_always_syncs_every_commit_of_a_long_patch_before_it_is_sent(
    traced_server: Traced,
) -> None:
    """A PATCH that lasts seconds is committed about once a second while it runs; each of
    those commits announces only bytes that an fdatasync, begun after they were written,
    made durable before the commit went to Redis."""
    block, blocks = 2**20, 30

    async def paced_body() -> AsyncIterator[bytes]:  # a slow client: 1 MiB every 0.1 s
        for index in range(blocks):
            yield bytes([index]) * block
            await asyncio.sleep(0.1)

    async with aiohttp.ClientSession() as http:
        headers = {**TUS, "Upload-Length": str(block * blocks)}
        async with http.post(traced_server.url, headers=headers) as response:
            url = response.headers["Location"]
        patch = {**patch_headers(0), "Content-Length": str(block * blocks)}
        async with http.patch(url, data=paced_body(), headers=patch) as response:
            assert response.status == 204, await response.text()
    upload_id = url.rstrip("/").rsplit("/", 1)[1]
    lines = await asyncio.to_thread(traced_server.stop)
    commit_sha = hashlib.sha1(lua.COMMIT.encode(), usedforsecurity=False).hexdigest()

    written: list[tuple[int, int]] = []  # (line on which the write returned, its offset)
    syncs: list[tuple[int, int]] = []  # (line it began on, line it returned on)
    commits: dict[int, int] = {}  # new offset -> line of the first commit sending it
    for index, line in enumerate(lines):
        if upload_id not in line:
            continue
        if match := PWRITE.search(line):
            count, offset = int(match.group(1)), int(match.group(2))
            assert count > 0
            written.append((_finished_at(lines, index), offset))
        elif " fdatasync(" in line or " fsync(" in line:
            syncs.append((index, _finished_at(lines, index)))
        elif commit_sha in line:
            args = _resp_strings(line)[8:]  # EVALSHA, sha, 5, five keys; then ARGV
            commits.setdefault(int(args[2]), index)  # ARGV: token, expected, new offset
    assert max(commits) == block * blocks
    assert len(commits) >= 3, f"expected commits while the PATCH ran, got {sorted(commits)}"
    for new_offset, commit_line in commits.items():
        last_write = max(done for done, offset in written if offset < new_offset)
        assert any(last_write < began and done < commit_line for began, done in syncs), (
            f"commit of {new_offset} bytes sent before they were synced"
        )
