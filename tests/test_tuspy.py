"""tuspy (PyPI's `tuspy`, the tus client for Python) against a real tusserver process: metadata,
a stop halfway and a resume through its URL storage in a new process's worth of objects,
tokens, per-chunk checksums and its asyncio uploader."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError
from tusclient.storage.filestorage import FileStorage

from tests.support.files import random_file
from tests.support.processes import ServerProcess, tusserver_process
from tests.support.sync_http import assert_stored_exactly, head, metadata_of
from tests.support.tus import bearer
from tusserver.auth import issue_token

SECRET = "tuspy-secret"
MiB = 2**20


@pytest.fixture(scope="module")
def dev_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from tusserver_process(tmp_path_factory.mktemp("tuspy-dev") / "data")


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from tusserver_process(tmp_path_factory.mktemp("tuspy-sec") / "data", "--secret", SECRET)


def token(*actions: str) -> str:
    return issue_token(SECRET, subject="tuspy", actions=actions, ttl_s=600)


class _KeptOpen(io.BufferedReader):
    def close(self) -> None:
        """tuspy closes the stream after fingerprinting it, then reads it again: ignore."""

    def release(self) -> None:
        super().close()


@contextmanager
def url_storage(path: Path) -> Iterator[FileStorage]:
    """tuspy's FileStorage (a TinyDB file of fingerprint -> upload URL), closed after use."""
    storage = FileStorage(str(path))  # type: ignore[no-untyped-call]
    try:
        yield storage
    finally:
        storage.close()  # type: ignore[no-untyped-call]


@contextmanager
def opened(path: Path) -> Iterator[io.BufferedReader]:
    """The file as tuspy's `file_stream`. Given a `file_path`, tuspy 1.1 opens the file once per
    chunk and never closes it (ResourceWarnings, errors here), so the test owns the file."""
    stream = _KeptOpen(io.FileIO(path))
    try:
        yield stream
    finally:
        stream.release()


def test_upload_with_metadata_stops_and_resumes_from_its_url_storage(
    dev_server: ServerProcess, tmp_path: Path
) -> None:
    path = tmp_path / "Résumé.pdf"
    data = random_file(path, 3 * MiB + 321)
    metadata = {"filename": "Résumé.pdf", "filetype": "application/pdf", "note": ""}

    with url_storage(tmp_path / "tus-urls.json") as storage, opened(path) as stream:
        first = TusClient(dev_server.url).uploader(
            file_stream=stream, chunk_size=MiB, metadata=metadata,
            store_url=True, url_storage=storage,
        )  # fmt: skip
        first.upload(stop_at=2 * MiB)
    # as if the program ended here: the next objects know only the storage file
    assert first.url is not None
    assert first.offset == 2 * MiB
    assert head(first.url).headers["Upload-Offset"] == str(2 * MiB)

    with url_storage(tmp_path / "tus-urls.json") as storage, opened(path) as stream:
        second = TusClient(dev_server.url).uploader(
            file_stream=stream, chunk_size=MiB, metadata=metadata,
            store_url=True, url_storage=storage,
        )  # fmt: skip
        assert second.url == first.url  # found through the file's fingerprint
        assert second.offset == 2 * MiB  # from HEAD
        second.upload()
    assert second.offset == len(data)
    assert_stored_exactly(first.url, data)
    stored = metadata_of(head(first.url))
    assert stored.pop("note") in (None, b"")
    assert stored == {"filename": "Résumé.pdf".encode(), "filetype": b"application/pdf"}


def test_token_header_and_per_chunk_checksums(
    secured_server: ServerProcess, tmp_path: Path
) -> None:
    path = tmp_path / "data.csv"
    data = random_file(path, 2 * MiB + 5)

    with opened(path) as stream, pytest.raises(TusCommunicationError) as refused:
        TusClient(secured_server.url).uploader(file_stream=stream).upload()
    assert refused.value.status_code == 401

    client = TusClient(secured_server.url, headers=bearer(token("create", "upload")))
    with opened(path) as stream:
        uploader = client.uploader(file_stream=stream, chunk_size=MiB, upload_checksum=True)
        uploader.upload()
    assert uploader.url is not None
    assert_stored_exactly(uploader.url, data, bearer(token("read")))


async def test_async_uploader(dev_server: ServerProcess, tmp_path: Path) -> None:
    path = tmp_path / "async.bin"
    data = random_file(path, MiB + 1)
    with opened(path) as stream:
        uploader = TusClient(dev_server.url).async_uploader(
            file_stream=stream, chunk_size=256 * 1024, metadata={"filename": "async.bin"}
        )
        await uploader.upload()
    assert uploader.url is not None
    assert uploader.offset == len(data)
    assert_stored_exactly(uploader.url, data)
