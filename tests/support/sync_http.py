"""Plain HTTP from the test's side with urllib, for tests whose client runs elsewhere (Node,
Chromium, tuspy) and that need no event loop: HEAD, GET and the stored bytes' SHA-256."""

from __future__ import annotations

import base64
import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass

from tests.support.tus import TUS, repr_digest_of
from tests.support.waiting import wait_until_sync


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
    """A HEAD of the upload at `url`, which must answer 200."""
    answer = http_request("HEAD", url, {**TUS, **(headers or {})})
    assert answer.status == 200, answer
    return answer


def wait_for_digest(url: str, headers: dict[str, str] | None = None, timeout_s: float = 30) -> str:
    """HEAD until the server has hashed the finished upload; its Repr-Digest."""
    found: list[Answer] = []

    def has_digest() -> bool:
        found[:] = [head(url, headers)]
        return "Repr-Digest" in found[0].headers

    wait_until_sync(
        has_digest, timeout_s, 0.05, what=lambda: f"a Repr-Digest for {url}: {found[0]}"
    )
    return found[0].headers["Repr-Digest"]


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
