"""tus-js-client (npm, pinned in tests/js/package.json) in Node against a real tusserver process:
plain, aborted and resumed, killed and resumed, with a token, with overridePatchMethod, fixed
chunks, a deferred length and parallel uploads (concatenation). Every upload ends with the same
bytes and the same SHA-256 on the server as in the file that was sent.

The helpers here (`tusserver_process`, `http_request`, `wait_for_digest`, ...) are also used by
test_browser.py and test_tuspy.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerProcess, has_tool, require_tool, start_process
from tusserver.auth import issue_token

JS_DIR = Path(__file__).parent / "js"
SECRET = "js-client-secret"
MiB = 2**20


def require_node_package(package: str) -> None:
    """Skip (or fail under TUS_TEST_REQUIRE_ALL=1) unless Node and `package` are installed."""
    require_tool(has_tool("node"), "Node.js is not installed (.ci/install-tools.sh installs it)")
    require_tool(
        (JS_DIR / "node_modules" / package / "package.json").is_file(),
        f"{package} is not installed: run `npm ci` in tests/js (.ci/install-tools.sh does)",
    )


# -- a real tusserver process ------------------------------------------------------------


def tusserver_process(data_dir: Path, *args: str) -> Iterator[ServerProcess]:
    """A `tusserver` subprocess (its own embedded Valkey) for a module's tests; stopped after."""
    process = start_process(data_dir, *args)
    try:
        yield process
    finally:
        try:
            if process.stop() != 0:
                print(process.log())
        except subprocess.TimeoutExpired:
            process.process.kill()
            process.process.wait()
            pidfile = data_dir / "redis" / "valkey.pid"  # a killed supervisor leaves it behind
            if pidfile.exists():
                os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from tusserver_process(tmp_path_factory.mktemp("dev") / "data")


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from tusserver_process(tmp_path_factory.mktemp("secured") / "data", "--secret", SECRET)


def token(*actions: str) -> str:
    return issue_token(SECRET, subject="js-client", actions=actions, ttl_s=600)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


# -- plain HTTP from the test's side -------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_request(method: str, url: str, headers: dict[str, str] | None = None) -> Answer:
    """One request with urllib; 4xx and 5xx are answers, not exceptions."""
    request = urllib.request.Request(url, method=method, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return Answer(response.status, dict(response.headers.items()), response.read())
    except urllib.error.HTTPError as error:
        return Answer(error.code, dict(error.headers.items()), error.read())


def head(url: str, headers: dict[str, str] | None = None) -> Answer:
    answer = http_request("HEAD", url, {"Tus-Resumable": "1.0.0", **(headers or {})})
    assert answer.status == 200, answer
    return answer


def repr_digest_of(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def wait_for_digest(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30) -> str:
    """Poll HEAD until the server has hashed the finished upload; its Repr-Digest."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = head(url, headers)
        if "Repr-Digest" in answer.headers:
            return answer.headers["Repr-Digest"]
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} has no Repr-Digest after {timeout_s}s: {answer}")
        time.sleep(0.05)


def assert_stored_exactly(url: str, data: bytes, headers: dict[str, str] | None = None) -> None:
    """The server holds `data` at `url`: same SHA-256 (Repr-Digest) and same bytes (GET)."""
    assert wait_for_digest(url, headers) == repr_digest_of(data)
    download = http_request("GET", url, headers)
    assert download.status == 200, download
    assert hashlib.sha256(download.body).hexdigest() == hashlib.sha256(data).hexdigest()
    assert download.body == data


def metadata_of(answer: Answer) -> dict[str, bytes | None]:
    """Upload-Metadata of a HEAD answer, decoded (a key without a value maps to None)."""
    pairs = [p.strip().partition(" ") for p in answer.headers["Upload-Metadata"].split(",")]
    return {key: base64.b64decode(value) if space else None for key, space, value in pairs}


def random_file(path: Path, size: int) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


# -- tus-js-client ---------------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind!r} event: {self}"
        return found[0]

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.of("request")

    def sent(self, method: str) -> list[dict[str, Any]]:
        return [request for request in self.requests if request["method"] == method]


def run_tus_js_client(**options: Any) -> Run:
    """Run tests/js/tus_upload.mjs with `options`; its JSON events."""
    process = subprocess.run(
        ["node", str(JS_DIR / "tus_upload.mjs"), json.dumps(options)],
        capture_output=True, text=True, timeout=120, cwd=JS_DIR,
    )  # fmt: skip
    events = [json.loads(line) for line in process.stdout.splitlines() if line.strip()]
    return Run(process.returncode, events, process.stderr)


@pytest.fixture(scope="module", autouse=True)
def _tus_js_client_installed() -> None:  # module scope: checked before any server starts
    require_node_package("tus-js-client")


def test_upload_aborted_halfway_resumes_from_its_fingerprint(
    dev_server: ServerProcess, tmp_path: Path
) -> None:
    data = random_file(tmp_path / "video.bin", 6 * MiB + 12345)
    storage = tmp_path / "tus-urls.json"
    common = {"endpoint": dev_server.url, "file": str(tmp_path / "video.bin"),
              "storage": str(storage), "chunkSize": MiB}  # fmt: skip

    first = run_tus_js_client(**common, stopAfterBytes=3 * MiB)
    assert first.returncode == 0, first
    aborted = first.one("aborted")
    url = aborted["url"]
    assert first.of("success") == []
    kept = int(head(url).headers["Upload-Offset"])
    assert 3 * MiB <= kept < len(data)
    assert url in storage.read_text()  # the fingerprint that the next run looks up

    second = run_tus_js_client(**common, resume=True)
    assert second.returncode == 0, second
    assert second.one("previous")["urls"] == [url]
    assert second.sent("POST") == []  # no new upload: the stored one goes on
    assert second.requests[0]["method"] == "HEAD" and second.requests[0]["url"] == url
    assert second.sent("PATCH")[0]["headers"]["Upload-Offset"] == str(kept)
    assert second.one("success")["url"] == url
    assert_stored_exactly(url, data)
    assert url not in storage.read_text()  # removeFingerprintOnSuccess


def test_app_killed_mid_upload_resumes_from_the_stored_url_with_method_override(
    dev_server: ServerProcess, tmp_path: Path
) -> None:
    """A phone app's habits: PATCH hidden in POST + X-HTTP-Method-Override, fixed chunks, a
    metadata key without a value, killed mid-upload and resumed from its stored URL."""
    data = random_file(tmp_path / "IMG_0001.HEIC", 3 * MiB + 1)
    storage = tmp_path / "tus-urls.json"
    common = {
        "endpoint": dev_server.url, "file": str(tmp_path / "IMG_0001.HEIC"),
        "storage": str(storage), "chunkSize": 512 * 1024, "overridePatchMethod": True,
        "metadata": {"filename": "IMG_0001.HEIC", "filetype": "image/heic", "is_live": ""},
    }  # fmt: skip

    killed = run_tus_js_client(**common, killAfterBytes=MiB)
    assert killed.returncode == -9, killed
    url = killed.one("killing")["url"]
    assert int(head(url).headers["Upload-Offset"]) == MiB
    assert killed.sent("PATCH") == []
    overridden = [r for r in killed.sent("POST") if r["url"] == url]
    assert len(overridden) == 2
    assert all(r["headers"]["X-HTTP-Method-Override"] == "PATCH" for r in overridden)

    resumed = run_tus_js_client(**common, resume=True)
    assert resumed.returncode == 0, resumed
    assert resumed.one("previous")["urls"] == [url]
    chunks = resumed.sent("POST")
    assert [r["headers"]["Upload-Offset"] for r in chunks] == [
        str(offset) for offset in range(MiB, len(data), 512 * 1024)
    ]
    assert all(
        r["url"] == url and r["headers"]["X-HTTP-Method-Override"] == "PATCH" for r in chunks
    )
    assert resumed.sent("PATCH") == []
    assert_stored_exactly(url, data)
    metadata = metadata_of(head(url))
    assert metadata.pop("is_live") in (None, b"")  # a key without a value, either spelling
    assert metadata == {"filename": b"IMG_0001.HEIC", "filetype": b"image/heic"}


def test_fixed_chunk_size_sends_one_patch_per_chunk(
    dev_server: ServerProcess, tmp_path: Path
) -> None:
    data = random_file(tmp_path / "chunks.bin", 5 * 256 * 1024 + 7)
    run = run_tus_js_client(endpoint=dev_server.url, file=str(tmp_path / "chunks.bin"),
                            chunkSize=256 * 1024)  # fmt: skip
    assert run.returncode == 0, run
    offsets = [int(r["headers"]["Upload-Offset"]) for r in run.sent("PATCH")]
    assert offsets == [i * 256 * 1024 for i in range(math.ceil(len(data) / (256 * 1024)))]
    assert_stored_exactly(run.one("success")["url"], data)


def test_upload_length_deferred_is_declared_with_the_last_chunk(
    dev_server: ServerProcess, tmp_path: Path
) -> None:
    data = random_file(tmp_path / "stream.bin", 2 * MiB + 3)
    run = run_tus_js_client(endpoint=dev_server.url, file=str(tmp_path / "stream.bin"),
                            uploadLengthDeferred=True, chunkSize=MiB)  # fmt: skip
    assert run.returncode == 0, run
    [created] = run.sent("POST")
    assert created["headers"]["Upload-Defer-Length"] == "1"
    assert "Upload-Length" not in created["headers"]
    patches = run.sent("PATCH")
    assert "Upload-Length" not in patches[0]["headers"]
    assert patches[-1]["headers"]["Upload-Length"] == str(len(data))
    url = run.one("success")["url"]
    assert head(url).headers["Upload-Length"] == str(len(data))
    assert_stored_exactly(url, data)


def test_parallel_uploads_are_concatenated(dev_server: ServerProcess, tmp_path: Path) -> None:
    extensions = http_request("OPTIONS", dev_server.url).headers.get("Tus-Extension", "")
    if "concatenation" not in extensions.split(","):
        pytest.xfail("needs concatenation")
    data = random_file(tmp_path / "parallel.bin", 3 * MiB + 5)
    run = run_tus_js_client(endpoint=dev_server.url, file=str(tmp_path / "parallel.bin"),
                            parallelUploads=3, metadata={"filename": "parallel.bin"})  # fmt: skip
    assert run.returncode == 0, run
    concat = [r["headers"].get("Upload-Concat", "").split(";")[0] for r in run.sent("POST")]
    assert sorted(concat) == ["final", "partial", "partial", "partial"]
    url = run.one("success")["url"]
    final = head(url)
    assert final.headers["Upload-Concat"].startswith("final;")
    assert len(final.headers["Upload-Concat"].split()) == 3
    assert_stored_exactly(url, data)


def test_token_in_the_authorization_header(secured_server: ServerProcess, tmp_path: Path) -> None:
    data = random_file(tmp_path / "secret.bin", MiB + 99)
    common = {"endpoint": secured_server.url, "file": str(tmp_path / "secret.bin")}

    refused = run_tus_js_client(**common)
    assert refused.returncode == 1
    assert refused.one("error")["status"] == 401

    run = run_tus_js_client(**common, token=token("create", "upload"), chunkSize=MiB // 2)
    assert run.returncode == 0, run
    assert {r["headers"]["Authorization"] for r in run.requests} == {"present"}
    url = run.one("success")["url"]
    assert_stored_exactly(url, data, bearer(token("read")))
    other = issue_token(SECRET, subject="somebody-else", actions=["read"], ttl_s=600)
    not_theirs = http_request("HEAD", url, {"Tus-Resumable": "1.0.0", **bearer(other)})
    assert not_theirs.status == 404
