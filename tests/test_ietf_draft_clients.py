"""Draft uploads from real clients and across processes: tus-js-client (npm, pinned in
tests/js) in its draft modes, `ietf-draft-03` (interop 5) and `ietf-draft-05` (interop 6), in
Node and in Debian's headless Chromium, paused and resumed; and a draft upload through
`tusserver --workers 2` on raw sockets, interrupted on one worker and resumed on the other.
Every upload ends with the file's bytes on disk and its SHA-256 in the draft's `Repr-Digest`.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.files import file_of, random_file
from tests.support.node import Run, require_node_package, run_script
from tests.support.processes import ServerProcess, tusserver_process
from tests.support.raw_http import RawRequest, RawResponse, request_bytes
from tests.support.sync_http import assert_stored_exactly, head, http_request, metadata_of
from tests.support.tools import require_tool
from tests.support.tus import repr_digest_of
from tests.support.waiting import wait_until, wait_until_sync
from tests.support.workers import children_of, holder_of

MiB = 2**20
CHROMIUM = Path("/usr/bin/chromium")
INTEROP = {"ietf-draft-03": 5, "ietf-draft-05": 6}  # what tus-js-client 4.3.1 sends
PROTOCOLS = list(INTEROP)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from tusserver_process(tmp_path_factory.mktemp("draft-clients") / "data")


def draft_head(url: str, interop: int) -> dict[str, str]:
    """A draft offset retrieval (204); its header fields."""
    answer = http_request("HEAD", url, {"Upload-Draft-Interop-Version": str(interop)})
    assert answer.status == 204, answer
    return answer.headers


def assert_finished_as_draft(url: str, interop: int, data: bytes) -> None:
    """The same bytes and SHA-256 on the server (tus HEAD and GET), and the draft's own view
    of the finished upload: complete, every byte in, `Repr-Digest` of `data`."""
    assert_stored_exactly(url, data)
    state = draft_head(url, interop)
    assert state["Upload-Complete"] == "?1"
    assert state["Upload-Offset"] == state["Upload-Length"] == str(len(data))
    assert state["Repr-Digest"] == repr_digest_of(data)


# -- tus-js-client in Node --------------------------------------------------------------------


@pytest.fixture(scope="module")
def node_client() -> None:  # module scope: checked before any server starts
    require_node_package("tus-js-client")


def run_node(**options: Any) -> Run:
    """tests/js/tus_upload.mjs with `options`; its JSON events."""
    return run_script("tus_upload.mjs", options, timeout_s=120)


def assert_speaks_draft(run: Run, interop: int) -> None:
    """Every request names the interop version and none is tus; appends are typed as the
    version requires (`application/partial-upload` from interop 6 on)."""
    for request in run.requests:
        assert request["headers"]["Upload-Draft-Interop-Version"] == str(interop), request
        assert "Tus-Resumable" not in request["headers"], request
    for request in run.sent("PATCH"):
        assert request["headers"].get("Content-Type") == (
            "application/partial-upload" if interop >= 6 else None
        ), request


@pytest.mark.parametrize("data_during_creation", [False, True], ids=["empty-post", "post-data"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_node_draft_upload_paused_and_resumed_from_its_fingerprint(
    node_client: None,
    server: ServerProcess,
    tmp_path: Path,
    protocol: str,
    data_during_creation: bool,
) -> None:
    interop = INTEROP[protocol]
    data = random_file(tmp_path / "clip.mov", 4 * MiB + 321)
    storage = tmp_path / "tus-urls.json"
    common = {
        "endpoint": server.url, "file": str(tmp_path / "clip.mov"), "storage": str(storage),
        "chunkSize": MiB, "protocol": protocol, "metadata": {"filename": "clip.mov"},
        "uploadDataDuringCreation": data_during_creation,
    }  # fmt: skip

    paused = run_node(**common, stopAfterBytes=2 * MiB)
    assert paused.returncode == 0, paused
    assert_speaks_draft(paused, interop)
    [created] = [r for r in paused.of("response") if r["method"] == "POST"]
    assert created["status"] == 201
    url = created["headers"]["Location"]  # in the final answer: the client never sees a 104
    assert paused.one("aborted")["url"] == url
    assert paused.of("success") == []
    state = draft_head(url, interop)
    assert state["Upload-Offset"] == str(2 * MiB)
    assert state["Upload-Complete"] == "?0"
    assert state["Upload-Length"] == str(len(data))

    resumed = run_node(**common, resume=True)
    assert resumed.returncode == 0, resumed
    assert_speaks_draft(resumed, interop)
    assert resumed.one("previous")["urls"] == [url]
    assert resumed.sent("POST") == []
    assert resumed.requests[0]["method"] == "HEAD" and resumed.requests[0]["url"] == url
    assert [r["headers"]["Upload-Offset"] for r in resumed.sent("PATCH")] == [
        str(2 * MiB), str(3 * MiB), str(4 * MiB),
    ]  # fmt: skip
    last = resumed.of("response")[-1]
    assert last["status"] == 204
    assert last["headers"]["Upload-Complete"] == "?1"
    assert last["headers"]["Upload-Offset"] == str(len(data))
    assert resumed.one("success")["url"] == url
    assert_finished_as_draft(url, interop, data)
    assert metadata_of(head(url))["filename"] == b"clip.mov"  # from its Upload-Metadata
    assert url not in storage.read_text()  # removeFingerprintOnSuccess


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_node_draft_upload_of_unknown_length_is_completed_by_its_last_append(
    node_client: None, server: ServerProcess, tmp_path: Path, protocol: str
) -> None:
    interop = INTEROP[protocol]
    data = random_file(tmp_path / "stream.bin", 2 * MiB + 5)
    run = run_node(endpoint=server.url, file=str(tmp_path / "stream.bin"), chunkSize=MiB,
                   protocol=protocol, uploadLengthDeferred=True)  # fmt: skip
    assert run.returncode == 0, run
    assert_speaks_draft(run, interop)
    [created] = run.sent("POST")
    assert created["headers"]["Upload-Complete"] == "?0"
    assert "Upload-Length" not in created["headers"]
    patches = run.sent("PATCH")
    assert [p["headers"]["Upload-Complete"] for p in patches] == ["?0", "?0", "?1"]
    assert patches[-1]["headers"]["Upload-Length"] == str(len(data))
    assert_finished_as_draft(run.one("success")["url"], interop, data)


# -- tus-js-client in Chromium ----------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> None:
    require_tool(
        CHROMIUM.exists(), "Debian's chromium is missing (.ci/install-tools.sh installs it)"
    )
    require_node_package("playwright-core")
    require_node_package("tus-js-client")


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_browser_draft_upload_aborted_mid_append_resumes_from_what_the_server_kept(
    browser: None, server: ServerProcess, tmp_path: Path, protocol: str
) -> None:
    """tus-js-client's browser build on a page of another origin (CORS), its uploads
    throttled so that abort() cuts a running PATCH off; a new Upload finds the URL in
    localStorage, asks the server for the offset and sends the rest."""
    interop = INTEROP[protocol]
    data = random_file(tmp_path / "scan.pdf", 6 * MiB + 4321)
    run = run_script(
        "browser_tus_draft.mjs",
        {
            "endpoint": server.url, "file": str(tmp_path / "scan.pdf"), "protocol": protocol,
            "chunkSize": 2 * MiB, "abortAtBytes": 3 * MiB, "uploadBytesPerSecond": 2 * MiB,
        },
        timeout_s=180,
    )  # fmt: skip
    assert run.returncode == 0, run
    faults = [
        e["text"] for e in run.of("console") if e["type"] == "pageerror" or "CORS" in e["text"]
    ]
    assert faults == []
    for request in run.requests:
        if request["method"] != "OPTIONS":  # Chromium's preflights carry no fields of ours
            assert request["headers"]["upload-draft-interop-version"] == str(interop), request
            assert "tus-resumable" not in request["headers"], request

    [created] = [r for r in run.of("response") if r["method"] == "POST"]
    assert created["status"] == 201
    url = created["headers"]["location"]  # a browser never shows the 104 to the script
    assert "location" in created["headers"]["access-control-expose-headers"].lower()
    aborted = run.one("aborted")
    assert aborted["url"] == url
    kept = run.one("kept")
    assert kept["status"] == 204
    assert 2 * MiB < kept["offset"] < len(data)  # the cut-off PATCH kept what had arrived
    resumed = [r for r in run.requests if r["phase"] == "resumed" and r["method"] != "OPTIONS"]
    assert [r["method"] for r in resumed[:2]] == ["HEAD", "PATCH"]
    [offset] = [
        int(r["headers"]["upload-offset"])
        for r in run.of("response") if r["phase"] == "resumed" and r["method"] == "HEAD"
    ]  # fmt: skip
    # bytes still in flight at the first look may have landed since; none is ever lost
    assert kept["offset"] <= offset < len(data)
    assert resumed[1]["headers"]["upload-offset"] == str(offset)
    for append in [r for r in run.requests if r["method"] == "PATCH"]:
        assert append["headers"].get("content-type") == (
            "application/partial-upload" if interop >= 6 else None
        ), append
    assert resumed[-1]["headers"]["upload-complete"] == "?1"
    assert run.one("success")["url"] == url
    assert_finished_as_draft(url, interop, data)


# -- two workers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    if sys.platform != "linux":
        pytest.skip("reads /proc")
    yield from tusserver_process(
        tmp_path_factory.mktemp("draft-workers") / "data", "--workers", "2"
    )


def workers_of(server: ServerProcess) -> set[int]:
    """The two worker pids (the supervisor's children but its Valkey)."""
    valkey = int((server.data_dir / "redis" / "valkey.pid").read_text())
    wait_until_sync(
        lambda: len(children_of(server.process.pid) - {valkey}) == 2, 20, what="two workers"
    )
    return children_of(server.process.pid) - {valkey}


async def accepting_worker(server: ServerProcess, connection: RawRequest, workers: set[int]) -> int:
    """The worker that accepts `connection` (once one has)."""
    found: list[int] = []

    def accepted() -> bool:
        holder = holder_of(server, connection, workers)
        found[:] = [] if holder is None else [holder]
        return bool(found)

    await wait_until(accepted, 10, 0.005, what="a worker accepting the connection")
    return found[0]


async def connection_to(server: ServerProcess, worker: int, workers: set[int]) -> RawRequest:
    """A new connection that `worker` accepted (the kernel spreads connections over the
    workers: others are opened and closed until one lands there)."""
    for _ in range(200):
        connection = await RawRequest.connect(server.url)
        if await accepting_worker(server, connection, workers) == worker:
            return connection
        await connection.close()
    raise AssertionError(f"200 connections and none landed on worker {worker}")


def draft_fields(interop: int, *, is_complete: bool) -> list[tuple[str, str]]:
    if interop == 3:
        completeness = ("Upload-Incomplete", "?0" if is_complete else "?1")
    else:
        completeness = ("Upload-Complete", "?1" if is_complete else "?0")
    return [("Upload-Draft-Interop-Version", str(interop)), completeness]


def completing_append(interop: int, host: str, offset: int, size: int) -> list[tuple[str, str]]:
    """The fields of an append that completes the upload (of `size` bytes from `offset`)."""
    typed = [("Content-Type", "application/partial-upload")] if interop >= 6 else []
    return [("Host", host), *draft_fields(interop, is_complete=True), *typed,
            ("Upload-Offset", str(offset)), ("Content-Length", str(size))]  # fmt: skip


def says_complete(answer: RawResponse, interop: int) -> bool:
    """What the answer's completeness field says, in the version's spelling (v3: inverted)."""
    if interop == 3:
        return {"?0": True, "?1": False}[answer.headers["upload-incomplete"]]
    return {"?1": True, "?0": False}[answer.headers["upload-complete"]]


async def interrupted(
    connection: RawRequest,
    method: str,
    target: str,
    fields: list[tuple[str, str]],
    content: bytes,
    sent: int,
) -> list[RawResponse]:
    """Send a request announcing all of `content` but only its first `sent` bytes, wait until
    the server has read them, and drop the connection; the interim answers that came."""
    await connection.send(request_bytes(method, target, fields) + content[:sent])
    interim = []
    if method == "POST":  # a versioned creation announces its URL before reading the content
        interim.append(await connection.response(has_body=False))
    await wait_until(connection.is_read_by_server, what="the server reading what was sent")
    await connection.close()
    return interim


@pytest.mark.parametrize("interop", [3, 6])
async def test_draft_upload_interrupted_and_resumed_across_two_workers(
    two_workers: ServerProcess, interop: int
) -> None:
    """Created on one worker and cut off (the client has the URL from the 104), resumed on
    the other and cut off again, finished on the first: each HEAD, on whichever worker,
    answers with every byte the other one read."""
    server = two_workers
    first, second = sorted(workers_of(server))
    data = bytes(range(256)) * (12 * 1024 + 3)  # a little over 3 MiB
    cut1, cut2 = MiB + 7, 2 * MiB + 99
    host = f"127.0.0.1:{server.port}"

    creating = await connection_to(server, first, {first, second})
    fields = [("Host", host), *draft_fields(interop, is_complete=True),
              ("Content-Length", str(len(data)))]  # fmt: skip
    (resumption,) = await interrupted(creating, "POST", "/files/", fields, data, cut1)
    assert resumption.status == 104
    url = resumption.headers["location"]
    path = url.removeprefix(f"http://127.0.0.1:{server.port}")

    async def offset_on(worker: int) -> RawResponse:
        connection = await connection_to(server, worker, {first, second})
        try:
            fields = [("Host", host), ("Upload-Draft-Interop-Version", str(interop))]
            await connection.send(request_bytes("HEAD", path, fields))
            answer = await connection.response(has_body=False)
        finally:
            await connection.close()
        assert answer.status == 204, answer
        return answer

    state = await offset_on(second)
    assert state.headers["upload-offset"] == str(cut1)
    assert not says_complete(state, interop)

    appending = await connection_to(server, second, {first, second})
    fields = completing_append(interop, host, cut1, len(data) - cut1)
    await interrupted(appending, "PATCH", path, fields, data[cut1:], cut2 - cut1)

    state = await offset_on(first)
    assert state.headers["upload-offset"] == str(cut2)
    assert not says_complete(state, interop)

    finishing = await connection_to(server, first, {first, second})
    try:
        fields = completing_append(interop, host, cut2, len(data) - cut2)
        await finishing.send(request_bytes("PATCH", path, fields, data[cut2:]))
        done = await finishing.response()
    finally:
        await finishing.close()
    assert done.status == 204, done
    assert done.headers["upload-offset"] == str(len(data))
    assert says_complete(done, interop)

    async def has_digest() -> bool:
        return "repr-digest" in (await offset_on(second)).headers

    await wait_until(has_digest, 30, what="the finished upload's Repr-Digest")
    assert (await offset_on(second)).headers["repr-digest"] == repr_digest_of(data)
    stored = await asyncio.to_thread(file_of(server.data_dir, url).read_bytes)
    assert stored == data
