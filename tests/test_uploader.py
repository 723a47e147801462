"""`tusserver upload` against real tusserver processes (and aiohttp-tus, a tus server without
batches): the uploader runs as a subprocess (`python -m tusserver upload ...`), so signals,
exit codes and output are the real ones."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.other_tus_server import OtherTusServer, other_tus_server
from tests.support.processes import ServerProcess, free_port
from tests.support.waiting import wait_until_sync
from tusserver import cli
from tusserver.auth import issue_token
from tusserver.uploader.batches import batches_url
from tusserver.uploader.files import ResumeState, StoredBatch, find_files, folder_key, resume_key
from tusserver.uploader.progress import PlainReporter
from tusserver.uploader.transfer import FileResult, RetryPolicy, is_retryable
from tusserver.uploader.tus import network_reason, parse_repr_digest

SECRET = "uploader-test-secret"
Processes = Callable[..., ServerProcess]
ANSI_OR_CR = re.compile(r"\x1b|\r")


# -- helpers -------------------------------------------------------------------------------


def write_random(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(seed).randbytes(size))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_upload(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tusserver", "upload", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def _interruptible() -> None:
    """In the child before it runs: Ctrl-C (SIGINT) as in a terminal. A test run started in
    the background of a non-interactive shell inherits SIGINT ignored, and Python then keeps
    it ignored: the uploader would never see the Ctrl-C the tests send."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def uploaders(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """Start uploader processes with output to files; each is killed (by PID) at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*args: str) -> subprocess.Popen[bytes]:
        n = len(started)
        with (
            open(tmp_path / f"upload-{n}.out", "wb") as out,
            open(tmp_path / f"upload-{n}.err", "wb") as err,
        ):
            process = subprocess.Popen(
                [sys.executable, "-m", "tusserver", "upload", *args], stdout=out, stderr=err,
                preexec_fn=_interruptible,
            )  # fmt: skip
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def request(
    url: str, method: str = "GET", token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    headers = {"Tus-Resumable": "1.0.0"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    sent = urllib.request.Request(url, method=method, headers=headers)  # noqa: S310 (http only)
    try:
        with urllib.request.urlopen(sent, timeout=10) as response:  # noqa: S310
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers.items()), error.read()


def server_offset(url: str, token: str | None = None) -> int:
    status, headers, _ = request(url, "HEAD", token)
    assert status == 200
    return int(headers["Upload-Offset"])


def listed_uploads(endpoint: str, token: str | None = None) -> dict[str, dict[str, Any]]:
    """The server's uploads, by their relativePath metadata."""
    status, _, body = request(endpoint + "?limit=1000", token=token)
    assert status == 200, body
    uploads = json.loads(body)["uploads"]
    by_path = {str(u["metadata"]["relativePath"]): u for u in uploads}
    assert len(by_path) == len(uploads), "two uploads of the same file"
    return by_path


def assert_identical_on_server(
    endpoint: str, files: dict[str, Path], token: str | None = None, batch: str | None = None
) -> None:
    """The server has exactly `files` (by relativePath), completed, with their bytes, each in
    `batch` (its metadata), or in none when `batch` is None."""
    uploads = listed_uploads(endpoint, token)
    assert set(uploads) == set(files)
    for relative_path, path in files.items():
        upload = uploads[relative_path]
        assert upload["state"] == "completed", relative_path
        assert upload["sha256"] == sha256_of(path), relative_path
        status, _, body = request(str(upload["url"]), token=token)
        assert status == 200
        assert body == path.read_bytes(), relative_path
        assert upload["metadata"]["filename"] == path.name
        assert upload["metadata"].get("batch") == batch, relative_path


BATCH_LINE = re.compile(r"batch (\S+): (http\S+) \((.+)\)")


def batches_said(output: str) -> dict[str, tuple[str, str]]:
    """The batches a run said it opened or resumed: id -> (URL, what the brackets say)."""
    return {m.group(1): (m.group(2), m.group(3)) for m in BATCH_LINE.finditer(output)}


def batch_view(url: str, token: str | None = None) -> dict[str, Any]:
    status, _, body = request(url, token=token)
    assert status == 200, body
    view: dict[str, Any] = json.loads(body)
    return view


def assert_batch_completed_with(url: str, files: dict[str, Path], token: str | None = None) -> str:
    """The batch at `url` is complete with exactly `files` as members (by path), each with its
    file's SHA-256; its id."""
    view = batch_view(url, token)
    assert view["state"] == "completed"
    assert view["expected"] == {
        "files": len(files), "bytes": sum(p.stat().st_size for p in files.values()) or None
    }  # fmt: skip
    members = {member["path"]: member for member in view["members"]}
    assert set(members) == set(files)
    for path, file in files.items():
        assert members[path]["state"] == "completed"
        assert members[path]["sha256"] == sha256_of(file), path
    return str(view["id"])


def batch_ids_in_state(state_file: Path) -> list[str]:
    return [str(entry["id"]) for entry in json.loads(state_file.read_text())["batches"].values()]


def state_entry(state_file: Path, path: Path) -> dict[str, object] | None:
    try:
        document = json.loads(state_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    for entry in document["uploads"].values():
        if entry["path"] == str(path.resolve()):
            return dict(entry)
    return None


WAIT_S = 30.0  # for an uploader process to reach a point the test watches for


# -- uploads of a folder -------------------------------------------------------------------


def make_tree(root: Path) -> dict[str, Path]:
    """A folder of mixed sizes, empty and multi-MiB files included, in nested folders; by
    their path inside it (the relativePath of a batch member)."""
    sizes = {
        "empty.txt": 0,
        "small.txt": 5,
        "sub/one.bin": 100 * 1024,
        "sub/naïve name.txt": 1000,
        "sub/deeper/three.bin": 3 * 2**20 + 7,
        "five.bin": 5 * 2**20,
    }
    files = {}
    for n, (name, size) in enumerate(sizes.items()):
        write_random(root / name, size, seed=n)
        files[name] = root / name
    return files


def test_folder_uploads_as_one_batch_in_parallel_with_identical_bytes_and_plain_lines(
    tmp_path: Path, processes: Processes
) -> None:
    server = processes(tmp_path / "data")
    files = make_tree(tmp_path / "tree")
    args = [str(tmp_path / "tree"), "--endpoint", server.url, "--parallel", "3",
            "--checksum", "sha256", "--state-file", str(tmp_path / "state.json")]  # fmt: skip

    first = run_upload(*args)

    assert first.returncode == 0, first.stdout + first.stderr
    [(batch_id, (url, said))] = batches_said(first.stdout).items()
    assert said == "tree, 6 files"
    assert url == f"{server.url}batches/{batch_id}"
    assert assert_batch_completed_with(url, files) == batch_id
    assert batch_view(url)["metadata"] == {"folder": "tree"}
    assert_identical_on_server(server.url, files, batch=batch_id)
    # no terminal: plain lines, no bars, no escape sequences, one "done" line per file
    assert not ANSI_OR_CR.search(first.stdout)
    lines = first.stdout.splitlines()
    assert lines[0].startswith("uploading 6 files (8.1 MiB) to ")
    assert "done tree/five.bin (5.0 MiB, SHA-256 verified)" in lines
    assert "done tree/empty.txt (0 B, SHA-256 verified)" in lines
    assert "done tree/sub/deeper/three.bin (3.0 MiB, SHA-256 verified)" in lines
    assert sum(line.startswith("done ") for line in lines) == 6
    assert lines[-2] == f"batch {batch_id}: completed, 6 files"
    assert lines[-1].startswith("6 uploaded, 0 skipped (uploaded before), 0 failed; 8.1 MiB")

    second = run_upload(*args)

    assert second.returncode == 0, second.stderr
    assert batches_said(second.stdout) == {batch_id: (url, "tree, 6 files, resumed")}
    assert f"batch {batch_id}: completed, 6 files" in second.stdout.splitlines()
    assert "0 uploaded, 6 skipped (uploaded before), 0 failed; 0 B sent" in second.stdout
    assert len(listed_uploads(server.url)) == 6  # nothing was uploaded again
    assert batch_ids_in_state(tmp_path / "state.json") == [batch_id]


def test_each_folder_is_its_own_batch_and_loose_files_are_plain_uploads(
    tmp_path: Path, processes: Processes
) -> None:
    server = processes(tmp_path / "data")
    write_random(tmp_path / "photos" / "2024" / "a.jpg", 300, seed=10)
    write_random(tmp_path / "photos" / "b.jpg", 200, seed=11)
    write_random(tmp_path / "docs" / "deep" / "er" / "c.txt", 100, seed=12)
    write_random(tmp_path / "loose.txt", 50, seed=13)

    result = run_upload(
        str(tmp_path / "photos"), str(tmp_path / "loose.txt"), str(tmp_path / "docs"),
        "--endpoint", server.url, "--state-file", str(tmp_path / "state.json"),
    )  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    said = batches_said(result.stdout)
    by_folder = {what: (batch_id, url) for batch_id, (url, what) in said.items()}
    assert set(by_folder) == {"photos, 2 files", "docs, 1 file"}
    photos_id, photos_url = by_folder["photos, 2 files"]
    docs_id, docs_url = by_folder["docs, 1 file"]
    assert photos_id != docs_id
    assert_batch_completed_with(
        photos_url, {"2024/a.jpg": tmp_path / "photos" / "2024" / "a.jpg",
                     "b.jpg": tmp_path / "photos" / "b.jpg"},
    )  # fmt: skip
    assert_batch_completed_with(docs_url, {"deep/er/c.txt": tmp_path / "docs/deep/er/c.txt"})
    uploads = listed_uploads(server.url)
    assert set(uploads) == {"2024/a.jpg", "b.jpg", "deep/er/c.txt", "loose.txt"}
    assert "batch" not in uploads["loose.txt"]["metadata"]
    assert uploads["b.jpg"]["metadata"]["batch"] == photos_id


def test_no_batch_sends_a_folder_as_separate_uploads_as_before(
    tmp_path: Path, processes: Processes
) -> None:
    server = processes(tmp_path / "data")
    write_random(tmp_path / "tree" / "sub" / "a.bin", 1000, seed=14)
    write_random(tmp_path / "tree" / "b.txt", 10, seed=15)

    result = run_upload(str(tmp_path / "tree"), "--endpoint", server.url, "--no-batch",
                        "--state-file", str(tmp_path / "state.json"))  # fmt: skip

    assert result.returncode == 0, result.stdout + result.stderr
    assert batches_said(result.stdout) == {}
    files = {"tree/sub/a.bin": tmp_path / "tree/sub/a.bin", "tree/b.txt": tmp_path / "tree/b.txt"}
    assert_identical_on_server(server.url, files, batch=None)
    assert "/files/batches" not in server.log()


@pytest.fixture
def other_server(tmp_path: Path) -> Iterator[OtherTusServer]:
    yield from other_tus_server(tmp_path)


def test_a_server_without_batches_gets_plain_uploads_with_a_warning(
    tmp_path: Path, other_server: OtherTusServer
) -> None:
    """aiohttp-tus answers 405 to POST <endpoint>/batches: the folder still goes, file by
    file, and a second run finds it all uploaded."""
    sizes = {"a.txt": 10, "sub/b.bin": 300_000, "sub/deeper/c.bin": 2 * 2**20 + 3}
    for n, (name, size) in enumerate(sizes.items()):
        write_random(tmp_path / "tree" / name, size, seed=20 + n)
    args = [str(tmp_path / "tree"), "--endpoint", other_server.url, "--chunk-size", "1MiB",
            "--state-file", str(tmp_path / "state.json")]  # fmt: skip

    first = run_upload(*args)

    assert first.returncode == 0, first.stdout + first.stderr
    assert "warning: the server has no batches (open a batch: 405 Method Not Allowed" in (
        first.stderr
    )
    assert "the files of each folder go as separate uploads" in first.stderr
    assert batches_said(first.stdout) == {}
    assert "3 uploaded, 0 skipped (uploaded before), 0 failed" in first.stdout
    for name in sizes:  # aiohttp-tus stores each file by its name
        stored = other_server.upload_dir / Path(name).name
        assert stored.read_bytes() == (tmp_path / "tree" / name).read_bytes(), name

    second = run_upload(*args)

    assert second.returncode == 0, second.stdout + second.stderr
    assert "0 uploaded, 3 skipped (uploaded before), 0 failed" in second.stdout


def test_on_a_terminal_each_file_gets_a_progress_bar(tmp_path: Path, processes: Processes) -> None:
    server = processes(tmp_path / "data")
    files = make_tree(tmp_path / "tree")
    controller, terminal = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "tusserver", "upload", str(tmp_path / "tree"), "--endpoint",
         server.url, "--state-file", str(tmp_path / "state.json"), "--chunk-size", "256KiB"],
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
    )  # fmt: skip
    os.close(terminal)
    shown = bytearray()
    try:
        while True:
            try:
                block = os.read(controller, 65536)
            except OSError:  # EIO: the uploader closed the terminal
                break
            if not block:
                break
            shown += block
        assert process.wait(30) == 0, shown.decode(errors="replace")
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()
            process.wait()
    text = shown.decode(errors="replace")
    assert "\x1b[1A" in text  # bars redrawn in place (cursor up)
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    assert re.search(r"total: 6/6 files +━+ 8\.5/8\.5 MB [\d.]+ [kMG]?B/s", plain), plain
    assert re.search(r"tree/five\.bin +━*╸?━* [\d.]+/5\.2 MB", plain), plain
    assert "done tree/five.bin (5.0 MiB)" in text
    [batch_id] = batch_ids_in_state(tmp_path / "state.json")
    assert f"batch {batch_id}: completed, 6 files" in plain
    assert_identical_on_server(server.url, files, batch=batch_id)


def test_interrupted_runs_resume_from_the_server_offset_in_the_same_batch(
    tmp_path: Path, processes: Processes, uploaders: Callable[..., subprocess.Popen[bytes]]
) -> None:
    server = processes(tmp_path / "data")
    small, big = tmp_path / "tree" / "small.txt", tmp_path / "tree" / "big.bin"
    write_random(small, 10, seed=1)
    # 64 MiB in 4 KiB requests: 16,384 requests, seconds of work however fast the server is,
    # so each interruption lands mid-upload (16 MiB in 16 KiB requests could finish first)
    write_random(big, 64 * 2**20, seed=2)
    state_file = tmp_path / "state.json"
    args = [str(tmp_path / "tree"), "--endpoint", server.url, "--parallel", "2",
            "--state-file", str(state_file), "--retry-delay", "0.1"]  # fmt: skip

    def big_url() -> str:
        entry = state_entry(state_file, big)
        return str(entry["url"]) if entry else ""

    def small_is_done() -> bool:
        entry = state_entry(state_file, small)
        return entry is not None and entry["done"] is True

    # Ctrl-C once the small file is done and the big one has bytes on the server
    first = uploaders(*args, "--chunk-size", "4KiB")
    wait_until_sync(
        lambda: bool(big_url()) and small_is_done(), WAIT_S, what="small done, big created"
    )
    url = big_url()
    wait_until_sync(lambda: server_offset(url) > 0, WAIT_S, what="big has bytes")
    first.send_signal(signal.SIGINT)
    assert first.wait(20) == 130
    assert "run the same command again" in (tmp_path / "upload-0.err").read_text()
    [(batch_id, (batch_url, said))] = batches_said((tmp_path / "upload-0.out").read_text()).items()
    assert said == "tree, 2 files"
    assert batch_ids_in_state(state_file) == [batch_id]
    interrupted = batch_view(batch_url)
    assert interrupted["state"] == "open"
    assert interrupted["progress"]["files_completed"] == 1
    assert {m["path"]: m["state"] for m in interrupted["members"]} == {
        "small.txt": "completed", "big.bin": "uploading"
    }  # fmt: skip
    offset_after_sigint = server_offset(url)
    assert 0 < offset_after_sigint < big.stat().st_size

    # the same command again, killed hard once it has moved the offset further
    second = uploaders(*args, "--chunk-size", "4KiB")
    second_out = tmp_path / "upload-1.out"
    resumed = "start tree/big.bin (64.0 MiB, resuming at "
    wait_until_sync(lambda: resumed in second_out.read_text(), WAIT_S, what="second run resumed")
    resumed_at = server_offset(url)
    wait_until_sync(lambda: server_offset(url) > resumed_at, WAIT_S, what="second run sent bytes")
    second.send_signal(signal.SIGKILL)
    assert second.wait(20) == -signal.SIGKILL
    offset_after_sigkill = server_offset(url)
    assert offset_after_sigint < offset_after_sigkill < big.stat().st_size
    assert big_url() == url  # resumed the same upload, not a new one
    resumed_batch = batches_said(second_out.read_text())
    assert resumed_batch == {batch_id: (batch_url, "tree, 2 files, resumed")}

    third = run_upload(*args, "--chunk-size", "4MiB", "--checksum", "sha256")

    assert third.returncode == 0, third.stdout + third.stderr
    lines = third.stdout.splitlines()
    assert "skip tree/small.txt (10 B, uploaded before)" in lines
    [resuming] = [line for line in lines if line.startswith("start tree/big.bin")]
    assert re.fullmatch(r"start tree/big\.bin \(64\.0 MiB, resuming at [1-9][\d.]* \w+\)", resuming)
    assert "done tree/big.bin (64.0 MiB, SHA-256 verified)" in lines
    assert batches_said(third.stdout) == {batch_id: (batch_url, "tree, 2 files, resumed")}
    assert f"batch {batch_id}: completed, 2 files" in lines
    files = {"small.txt": small, "big.bin": big}
    assert_batch_completed_with(batch_url, files)
    # every upload the three runs made is in that one batch, and the state names no other
    assert_identical_on_server(server.url, files, batch=batch_id)
    assert batch_ids_in_state(state_file) == [batch_id]
    assert big_url() == url


def test_a_server_restart_mid_upload_is_retried_until_done(
    tmp_path: Path, processes: Processes, uploaders: Callable[..., subprocess.Popen[bytes]]
) -> None:
    port = str(free_port())
    server = processes(tmp_path / "data", "--port", port)
    big = tmp_path / "big.bin"
    write_random(big, 4 * 2**20, seed=3)
    state_file = tmp_path / "state.json"
    uploader = uploaders(str(big), "--endpoint", server.url, "--chunk-size", "4KiB",
                         "--state-file", str(state_file), "--retry-delay", "0.2",
                         "--retries", "20")  # fmt: skip
    wait_until_sync(lambda: state_entry(state_file, big) is not None, WAIT_S, what="upload created")
    url = str(state_entry(state_file, big)["url"])  # type: ignore[index]
    wait_until_sync(lambda: server_offset(url) > 0, WAIT_S, what="bytes on the server")

    server.stop(signal.SIGTERM)  # running PATCHes get 503, then connections are refused
    processes(tmp_path / "data", "--port", port)

    assert uploader.wait(60) == 0
    err = (tmp_path / "upload-0.err").read_text()
    assert re.search(r"big\.bin: upload: (503 |network error).*; retry 1/20 in ", err), err
    assert_identical_on_server(server.url, {"big.bin": big})


# -- tokens --------------------------------------------------------------------------------


def test_an_expired_token_is_refused_clearly_and_renewed_by_the_token_command(
    tmp_path: Path, processes: Processes
) -> None:
    server = processes(tmp_path / "data", "--secret", SECRET)
    files = make_tree(tmp_path / "tree")
    actions = ["create", "upload", "read"]
    expired = issue_token(SECRET, subject="alice", actions=actions, ttl_s=60,
                          now=time.time() - 3600)  # fmt: skip
    state = ["--state-file", str(tmp_path / "state.json"), "--checksum", "sha256"]

    def fresh(subject: str) -> str:
        return issue_token(SECRET, subject=subject, actions=actions, ttl_s=60)

    for mode, said in [
        ([], "tusserver upload: tree: open a batch: 401 Unauthorized: token expired"),
        (["--no-batch"], "create the upload: 401 Unauthorized: token expired"),
    ]:
        refused = run_upload(str(tmp_path / "tree"), "--endpoint", server.url, "--token",
                             expired, *mode, *state)  # fmt: skip

        assert refused.returncode == 1
        assert said in refused.stderr
        assert "--token-command can renew it" in refused.stderr
        assert "retry" not in refused.stderr  # a 4xx is not retried
        assert listed_uploads(server.url, fresh("alice")) == {}

    # the command's first token is already expired (as a short one would be mid-run);
    # every later call prints a fresh one (calls are counted in the file named first)
    script = tmp_path / "fresh_token.py"  # not token.py: that would shadow a stdlib module
    script.write_text(
        "import pathlib, sys, time\n"
        "from tusserver.auth import issue_token\n"
        "calls = pathlib.Path(sys.argv[1])\n"
        "calls.write_text(calls.read_text() + 'x' if calls.exists() else 'x')\n"
        "now = time.time() - (3600 if len(calls.read_text()) == 1 else 0)\n"
        f"print(issue_token({SECRET!r}, subject=sys.argv[2], actions={actions!r}, ttl_s=60,"
        " now=now))\n"
    )

    def token_command(calls: Path, subject: str) -> str:
        return shlex.join([sys.executable, str(script), str(calls), subject])

    plain = run_upload(str(tmp_path / "tree"), "--endpoint", server.url, "--parallel", "3",
                       "--no-batch", "--token-command", token_command(tmp_path / "calls-a",
                       "alice"), *state)  # fmt: skip

    assert plain.returncode == 0, plain.stdout + plain.stderr
    # once at start, once after the 401s of all 3 threads
    assert (tmp_path / "calls-a").read_text() == "xx"
    assert_identical_on_server(server.url, {f"tree/{k}": v for k, v in files.items()},
                               fresh("alice"))  # fmt: skip

    batched = run_upload(str(tmp_path / "tree"), "--endpoint", server.url, "--parallel", "3",
                         "--token-command", token_command(tmp_path / "calls-b", "bob"),
                         *state)  # fmt: skip

    assert batched.returncode == 0, batched.stdout + batched.stderr
    # once at start, once after the 401 that opening the batch got
    assert (tmp_path / "calls-b").read_text() == "xx"
    [(batch_id, (batch_url, _))] = batches_said(batched.stdout).items()
    assert_batch_completed_with(batch_url, files, fresh("bob"))
    # a file sent plain before goes again in the batch: a batch member is its own upload
    assert "6 uploaded, 0 skipped" in batched.stdout
    assert_identical_on_server(server.url, files, fresh("bob"), batch=batch_id)


def test_a_token_without_the_create_action_is_a_clear_failure(
    tmp_path: Path, processes: Processes
) -> None:
    server = processes(tmp_path / "data", "--secret", SECRET)
    write_random(tmp_path / "a.bin", 10, seed=4)
    token = issue_token(SECRET, subject="bob", actions=["upload"], ttl_s=60)

    result = run_upload(str(tmp_path / "a.bin"), "--endpoint", server.url, "--token", token,
                        "--state-file", str(tmp_path / "state.json"))  # fmt: skip

    assert result.returncode == 1
    assert "failed: a.bin: create the upload: 403 Forbidden: this token does not allow create" in (
        result.stderr
    )
    assert "0 uploaded, 0 skipped (uploaded before), 1 failed" in result.stdout


# -- usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["missing-file", "--endpoint", "http://127.0.0.1:9/files/"], "missing-file: No such"),
        (["{file}", "--endpoint", "ftp://example/files/"], "must be an http:// or https:// URL"),
        (
            ["{file}", "--endpoint", "http://127.0.0.1:9/", "--token", "t", "--token-command", "c"],
            "not allowed with argument",
        ),
        (["{file}"], "the following arguments are required: --endpoint"),
        (["{file}", "--endpoint", "http://127.0.0.1:9/", "--parallel", "0"], "--parallel"),
        (["{file}", "--endpoint", "http://127.0.0.1:9/", "--chunk-size", "lots"], "not a size"),
    ],
)
def test_bad_usage_exits_2_with_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], said: str
) -> None:
    file = tmp_path / "f.txt"
    file.write_text("x")
    argv = ["upload", *(arg.replace("{file}", str(file)) for arg in args)]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = int(exit_.code or 0)
    assert code == 2
    assert said in capsys.readouterr().err


# -- the parts, on real files --------------------------------------------------------------


def test_folders_keep_relative_paths_and_each_file_is_found_once(tmp_path: Path) -> None:
    write_random(tmp_path / "photos" / "2024" / "a.jpg", 3, seed=5)
    write_random(tmp_path / "photos" / "b.jpg", 3, seed=6)
    write_random(tmp_path / "loose.txt", 3, seed=7)

    files, problems = find_files(
        [str(tmp_path / "photos"), str(tmp_path / "photos" / "b.jpg"), str(tmp_path / "loose.txt")]
    )

    assert problems == []
    assert [f.relative_path for f in files] == ["photos/b.jpg", "photos/2024/a.jpg", "loose.txt"]


def test_the_resume_key_changes_with_the_content_and_the_state_file_survives_reuse(
    tmp_path: Path,
) -> None:
    path = tmp_path / "f.bin"
    write_random(path, 200_000, seed=8)
    [before], _ = find_files([str(path)])
    key_before = resume_key("http://a/files/", before)
    state = ResumeState(tmp_path / "state" / "uploads.json")
    state.put(key_before, "http://a/files/1", path, is_done=False)

    with open(path, "r+b") as stream:  # same size, same mtime, different last bytes
        stream.seek(-1, 2)
        stream.write(b"\x00" if path.read_bytes()[-1] else b"\x01")
    os.utime(path, ns=(before.mtime_ns, before.mtime_ns))
    [after], _ = find_files([str(path)])

    assert after.mtime_ns == before.mtime_ns
    assert resume_key("http://a/files/", after) != key_before
    assert resume_key("http://b/files/", after) != resume_key("http://a/files/", after)
    entry = ResumeState(state.path).get(key_before)
    assert entry is not None and entry.url == "http://a/files/1" and not entry.is_done
    assert (state.path.stat().st_mode & 0o777) == 0o600


def test_the_batch_api_is_beside_the_endpoint_with_or_without_its_slash() -> None:
    assert batches_url("http://h:1/files/") == "http://h:1/files/batches"
    assert batches_url("http://h:1/files") == "http://h:1/files/batches"
    assert batches_url("https://h/up/load/?a=1#x") == "https://h/up/load/batches?a=1"


def test_the_state_file_keeps_batches_beside_uploads_and_a_file_key_names_its_batch(
    tmp_path: Path,
) -> None:
    write_random(tmp_path / "tree" / "sub" / "a.bin", 100, seed=16)
    [file], _ = find_files([str(tmp_path / "tree")])
    assert (file.relative_path, file.path_in_folder) == ("tree/sub/a.bin", "sub/a.bin")
    folder = (tmp_path / "tree").resolve()
    assert file.folder == folder
    endpoint = "http://a/files/"
    plain, batched = resume_key(endpoint, file), resume_key(endpoint, file, "b1")
    assert len({plain, batched, resume_key(endpoint, file, "b2")}) == 3
    state = ResumeState(tmp_path / "state.json")
    state.put(plain, "http://a/files/1", file.path, is_done=True)
    key = folder_key(endpoint, folder, [file])
    state.put_batch(key, StoredBatch("b1", "http://a/files/batches/b1"), folder)
    state.put(batched, "http://a/files/2", file.path, is_done=False)

    again = ResumeState(state.path)  # as the next run reads it
    assert again.get_batch(key) == StoredBatch("b1", "http://a/files/batches/b1")
    assert again.get(plain) is not None and again.get(plain).is_done  # type: ignore[union-attr]
    assert again.get(batched) is not None
    again.remove_batch(key)
    assert again.get_batch(key) is None and again.get(batched) is not None
    write_random(tmp_path / "tree" / "b.txt", 1, seed=17)  # another file: another folder key
    files, _ = find_files([str(tmp_path / "tree")])
    assert folder_key(endpoint, folder, files) != key


def test_retry_policy_retries_what_may_pass_and_backs_off() -> None:
    assert [s for s in (None, 400, 401, 403, 404, 409, 410, 413, 423, 460, 500, 503)
            if is_retryable(s)] == [None, 409, 423, 500, 503]  # fmt: skip
    policy = RetryPolicy(retries=5, base_delay_s=1.0, max_delay_s=8.0)
    assert 0.75 <= policy.delay_s(1) <= 1.25
    assert 3.0 <= policy.delay_s(3) <= 5.0
    assert 6.0 <= policy.delay_s(10) <= 10.0


def test_repr_digest_is_read_only_when_it_is_a_sha256() -> None:
    digest = hashlib.sha256(b"x").digest()
    b64 = base64.b64encode(digest).decode()
    assert parse_repr_digest(f"sha-256=:{b64}:") == digest
    assert parse_repr_digest(f"sha-512=:AAAA:, sha-256=:{b64}:") == digest
    assert parse_repr_digest("sha-256=:AAAA:") is None
    assert parse_repr_digest(None) is None


def test_network_errors_are_said_in_a_few_words() -> None:
    refused = (
        "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded with url: /files/ "
        "(Caused by NewConnectionError(\"HTTPConnection(host='127.0.0.1', port=9): Failed to "
        'establish a new connection: [Errno 111] Connection refused"))'
    )
    reset = "('Connection aborted.', ConnectionResetError(104, 'Connection reset by peer'))"
    timeout = "HTTPConnectionPool(host='127.0.0.1', port=9): Read timed out. (read timeout=60)"
    assert network_reason(refused) == "Connection refused"
    assert network_reason(reset) == "Connection reset by peer"
    assert network_reason(timeout) == "Read timed out. (read timeout=60)"


def test_plain_progress_lines_are_throttled(tmp_path: Path) -> None:
    write_random(tmp_path / "f.bin", 1000, seed=9)
    [file], _ = find_files([str(tmp_path / "f.bin")])
    out, err = io.StringIO(), io.StringIO()
    reporter = PlainReporter(out, err, every_s=3600)
    reporter.file_started(file, 0)
    for _ in range(10):
        reporter.file_sent(file, 100)
    reporter.file_done(FileResult(file, "uploaded", 1000))
    reporter.file_done(FileResult(file, "failed", 0, "nope"))

    assert out.getvalue().splitlines() == ["start f.bin (1000 B)", "done f.bin (1000 B)"]
    assert err.getvalue().splitlines() == ["FAIL f.bin: nope"]
