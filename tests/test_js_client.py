"""tus-js-client (npm, pinned in tests/js/package.json) in Node against a real tusserver process:
plain, aborted and resumed, killed and resumed, with a token, with overridePatchMethod, fixed
chunks, a deferred length and parallel uploads (concatenation). Every upload ends with the same
bytes and the same SHA-256 on the server as in the file that was sent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.files import random_file
from tests.support.node import Run, require_node_package, run_script
from tests.support.processes import ServerProcess, tusserver_process
from tests.support.sync_http import assert_stored_exactly, head, http_request, metadata_of
from tests.support.tus import bearer
from tusserver.auth import issue_token

SECRET = "js-client-secret"
MiB = 2**20


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from tusserver_process(tmp_path_factory.mktemp("dev") / "data")


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from tusserver_process(tmp_path_factory.mktemp("secured") / "data", "--secret", SECRET)


def token(*actions: str) -> str:
    return issue_token(SECRET, subject="js-client", actions=actions, ttl_s=600)


def run_tus_js_client(**options: Any) -> Run:
    """Run tests/js/tus_upload.mjs with `options`; its JSON events."""
    return run_script("tus_upload.mjs", options, timeout_s=120)


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
