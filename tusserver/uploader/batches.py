"""Folders as batches for `tusserver upload` (docs/uploader.md).

The files of each folder named on the command line go to the server as one batch: the
batch is opened first (`POST <endpoint>batches` with the folder's file count and bytes),
and every upload names it in its `batch` metadata with its path inside the folder, so the
service behind the server hears about the folder once, when all of it is there. The
batch's id is kept in the resume state under a key of the folder's files: running the
command again sends the rest into the same batch. A server without batches (404, 405 or
501 for the POST: another tus server) gets plain uploads.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests  # type: ignore[import-untyped, unused-ignore]
from tusclient.exceptions import TusCommunicationError

from tusserver.uploader.files import LocalFile, ResumeState, StoredBatch, folder_key
from tusserver.uploader.transfer import RetryPolicy, TokenSource, call_with_retries
from tusserver.uploader.tus import CONNECT_TIMEOUT_S, UploadFailed

_CommunicationError: Any = TusCommunicationError  # tuspy's own class, only partly annotated
NO_BATCHES = frozenset({404, 405, 501})  # what a server without the batch API answers
GONE = frozenset({404, 410})
SETTLE_POLL_S = 0.1


class BatchesUnsupported(Exception):
    """The server has no batch API; the message says what it answered."""


@dataclass(frozen=True)
class RemoteBatch:
    """A batch as the server shows it (the parts the uploader uses)."""

    batch_id: str
    url: str
    state: str  # open, sealed or completed
    files_completed: int

    @property
    def is_complete(self) -> bool:
        return self.state == "completed"


@dataclass(frozen=True)
class FolderBatch:
    """A folder's files and the batch they go in."""

    folder: Path
    files: list[LocalFile]
    batch: RemoteBatch
    is_resumed: bool  # opened by an earlier run of the command


def batches_url(endpoint: str) -> str:
    """`<endpoint>batches`, whether or not the endpoint ends with a slash."""
    parts = urlsplit(endpoint)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/batches", fragment=""))


class BatchClient:
    """The batch API of one endpoint, with the uploads' tokens, retries and timeouts."""

    def __init__(
        self,
        endpoint: str,
        tokens: TokenSource,
        retry: RetryPolicy,
        timeout_s: float,
        note: Callable[[str], None],
    ) -> None:
        self.url = batches_url(endpoint)
        self.tokens = tokens
        self.retry = retry
        self.timeouts = (CONNECT_TIMEOUT_S, timeout_s)
        self.note = note

    def open(self, files: int, total_bytes: int, folder_name: str) -> RemoteBatch:
        """Open a batch that completes when these files and bytes are complete. Raises
        BatchesUnsupported if the server has no batches, UploadFailed for any other
        refusal."""
        body: dict[str, object] = {"files": files, "metadata": {"folder": folder_name}}
        if total_bytes:  # a batch of empty files counts files alone
            body["bytes"] = total_bytes
        try:
            response = self._send("open a batch", "POST", self.url, body)
        except UploadFailed as error:
            if error.status in NO_BATCHES:
                raise BatchesUnsupported(str(error)) from None
            raise
        location = response.headers.get("Location")
        return _batch_of(response, urljoin(self.url, location) if location else None)

    def get(self, url: str) -> RemoteBatch | None:
        """The batch at `url`; None if the server no longer has it (404, 410)."""
        try:
            response = self._send("read the batch", "GET", url)
        except UploadFailed as error:
            if error.status in GONE:
                return None
            raise
        return _batch_of(response, url)

    def settled(self, batch: RemoteBatch, timeout_s: float) -> RemoteBatch | None:
        """The batch once it is complete, or as it is when `timeout_s` has passed (a server
        may complete a resumed upload after its last PATCH, once it has hashed it); None if
        it is gone."""
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.get(batch.url)
            if current is None or current.is_complete or time.monotonic() > deadline:
                return current
            time.sleep(SETTLE_POLL_S)

    def _send(
        self, what: str, method: str, url: str, body: dict[str, object] | None = None
    ) -> requests.Response:
        data = None if body is None else json.dumps(body).encode()
        json_type = {} if body is None else {"Content-Type": "application/json"}

        def send(auth_headers: dict[str, str]) -> requests.Response:
            try:
                response = requests.request(
                    method, url, data=data, headers={**json_type, **auth_headers},
                    timeout=self.timeouts, allow_redirects=False,
                )  # fmt: skip
            except requests.RequestException as error:
                raise _CommunicationError(error) from None
            if not 200 <= response.status_code < 300:
                raise _CommunicationError("", response.status_code, response.content)
            return response

        return call_with_retries(what, send, self.tokens, self.retry, self.note)


def _batch_of(response: requests.Response, url: str | None) -> RemoteBatch:
    """The batch in a JSON answer of the batch API; UploadFailed if it is not one."""
    try:
        view = response.json()
        batch_id, state = view["id"], view["state"]
        files_completed = view["progress"]["files_completed"]
        url = url or urljoin(response.url, view["url"])
    except (ValueError, KeyError, TypeError):
        raise UploadFailed(f"the server's answer is not a batch: {response.url}") from None
    if not isinstance(batch_id, str) or not isinstance(state, str):
        raise UploadFailed(f"the server's answer is not a batch: {response.url}")
    return RemoteBatch(batch_id, str(url), state, int(files_completed))


def open_folder_batches(
    folders: Mapping[Path, list[LocalFile]],
    state: ResumeState,
    client: BatchClient,
    endpoint: str,
) -> list[FolderBatch]:
    """A batch for each folder's files: the one an earlier run opened for the same files if
    the server still has it, else a new one (kept in the resume state). Raises
    BatchesUnsupported or UploadFailed (from BatchClient)."""
    opened = []
    for folder, files in folders.items():
        key = folder_key(endpoint, folder, files)
        stored = state.get_batch(key)
        batch = client.get(stored.url) if stored is not None else None
        if stored is not None and batch is not None and batch.batch_id == stored.batch_id:
            opened.append(FolderBatch(folder, files, batch, is_resumed=True))
            continue
        if stored is not None:
            client.note(f"{folder.name}: the batch {stored.batch_id} is gone; a new one")
            state.remove_batch(key)
        total_bytes = sum(file.size for file in files)
        try:
            batch = client.open(len(files), total_bytes, _text(folder.name))
        except UploadFailed as error:
            raise UploadFailed(f"{folder.name}: {error}", error.status) from None
        state.put_batch(key, StoredBatch(batch.batch_id, batch.url), folder)
        opened.append(FolderBatch(folder, files, batch, is_resumed=False))
    return opened


def _text(name: str) -> str:
    """A file name as text for JSON (names that are not UTF-8 get replacement characters)."""
    return os.fsencode(name).decode("utf-8", "replace")
