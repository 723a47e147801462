"""One file's trip to a tus server for `tusserver upload`: create or resume, PATCH chunk
after chunk, check, and record it in the resume state.

The requests themselves are tuspy's (see `uploader_tus`); here is the policy around them:
backoff and retry on network errors, 5xx, 409 and 423 (resyncing the offset by HEAD first),
a clear message and no retry on other 4xx, a fresh token from `--token-command` on 401, and
the end-to-end SHA-256 comparison with the server's `Repr-Digest`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Literal, Protocol, TypeVar

from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError

from tusserver.uploader.files import LocalFile, ResumeState, resume_key
from tusserver.uploader.tus import (
    FileUploader,
    UploadFailed,
    describe_failure,
    metadata_of,
    offset_of,
    parse_repr_digest,
)

T = TypeVar("T")
TOKEN_COMMAND_TIMEOUT_S = 60.0
MAX_AUTH_REFRESHES = 2  # per request: a fresh token that is refused too is a real refusal
HASH_BLOCK_BYTES = 1024 * 1024
RETRIED_4XX = frozenset({409, 423})  # offset moved under us / upload locked: resync and retry
GONE = frozenset({404, 410})


def is_retryable(status: int | None) -> bool:
    """Whether a failure may pass by itself: a network error (no status), 5xx, 409 or 423."""
    return status is None or status >= 500 or status in RETRIED_4XX


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    base_delay_s: float
    max_delay_s: float = 30.0

    def delay_s(self, failures: int) -> float:
        """Exponential backoff with jitter, so parallel uploads do not come back in step."""
        capped = min(self.max_delay_s, self.base_delay_s * 2.0 ** (failures - 1))
        return capped * random.uniform(0.75, 1.25)


class TokenSource:
    """The bearer token all uploads share; `--token-command` replaces it when refused."""

    def __init__(self, token: str | None, command: Sequence[str] | None) -> None:
        self._token = token
        self._command = list(command) if command else None
        self._lock = threading.Lock()

    @property
    def can_refresh(self) -> bool:
        return self._command is not None

    def current(self) -> str | None:
        with self._lock:
            return self._token

    def refresh(self, refused: str | None) -> None:
        """Run the token command unless another thread already replaced `refused`.

        Raises UploadFailed if the command cannot run, fails or prints no token."""
        with self._lock:
            if self._command is None or self._token != refused:
                return
            self._token = self._run_command(self._command)

    @staticmethod
    def _run_command(command: list[str]) -> str:
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=TOKEN_COMMAND_TIMEOUT_S
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise UploadFailed(f"--token-command could not run: {error}") from None
        if done.returncode != 0:
            said = (done.stderr.strip().splitlines() or [""])[-1][:200]
            raise UploadFailed(f"--token-command exited with status {done.returncode}: {said}")
        token = done.stdout.strip()
        if not token or len(token.split()) != 1:
            raise UploadFailed("--token-command must print one token on its standard output")
        return token

    def headers(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}


def file_sha256(path: os.PathLike[str] | str) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.digest()


class Progress(Protocol):
    """What a transfer tells the display."""

    def file_started(self, file: LocalFile, offset: int) -> None: ...
    def file_sent(self, file: LocalFile, nbytes: int) -> None: ...
    def file_offset(self, file: LocalFile, offset: int) -> None: ...
    def note(self, text: str) -> None: ...


@dataclass(frozen=True)
class UploadOptions:
    endpoint: str
    chunk_size: int
    checksum_algorithm: str | None  # sent as Upload-Checksum on every PATCH; None: none
    verify_sha256: bool
    retry: RetryPolicy
    timeout_s: float


@dataclass(frozen=True)
class FileResult:
    file: LocalFile
    outcome: Literal["uploaded", "skipped", "failed"]
    sent_bytes: int = 0
    detail: str = ""  # the failure, or what the SHA-256 check found


def call_with_retries(
    what: str,
    send: Callable[[dict[str, str]], T],
    tokens: TokenSource,
    retry: RetryPolicy,
    note: Callable[[str], None],
) -> T:
    """Run one request (`send`, given the auth headers) with the current token; refresh it on
    401, retry what may pass with backoff (saying so through `note`); raise UploadFailed with
    a clear reason for anything else. `send` raises TusCommunicationError for a failure."""
    failures = refreshes = 0
    while True:
        token = tokens.current()
        try:
            return send(tokens.headers(token))
        except TusCommunicationError as error:
            status: int | None = error.status_code
            reason = f"{what}: {describe_failure(error)}"
        if status == 401 and tokens.can_refresh and refreshes < MAX_AUTH_REFRESHES:
            refreshes += 1
            tokens.refresh(token)
            continue
        if status == 401 and not tokens.can_refresh:
            reason += " (the token was refused or has expired; --token-command can renew it)"
        if not is_retryable(status):
            raise UploadFailed(reason, status)
        failures += 1
        if failures > retry.retries:
            raise UploadFailed(f"{reason} (gave up after {retry.retries} retries)", status)
        delay_s = retry.delay_s(failures)
        note(f"{reason}; retry {failures}/{retry.retries} in {delay_s:.1f} s")
        time.sleep(delay_s)


# -- one file ------------------------------------------------------------------------------


def upload_file(
    file: LocalFile,
    state: ResumeState,
    tokens: TokenSource,
    options: UploadOptions,
    progress: Progress,
    batch: str | None = None,
) -> FileResult:
    """Upload (or resume, or skip as finished) one file, as a member of `batch` if given;
    never raises for a failed upload."""
    transfer: _Transfer | None = None
    try:
        key = resume_key(options.endpoint, file, batch)
        entry = state.get(key)
        if entry is not None and entry.is_done:
            return FileResult(file, "skipped")
        with open(file.path, "rb") as stream:
            transfer = _Transfer(file, stream, tokens, options, progress, batch)
            try:
                return transfer.run(key, entry.url if entry else None, state)
            finally:
                transfer.uploader.close()
    except UploadFailed as error:
        return FileResult(file, "failed", transfer.sent if transfer else 0, str(error))
    except OSError as error:  # reading the file, or writing the state file
        where = f": {error.filename}" if error.filename else ""
        reason = f"{error.strerror or error}{where}"
        return FileResult(file, "failed", transfer.sent if transfer else 0, reason)


class _Transfer:
    def __init__(
        self,
        file: LocalFile,
        stream: IO[bytes],
        tokens: TokenSource,
        options: UploadOptions,
        progress: Progress,
        batch: str | None,
    ) -> None:
        self.file = file
        self.tokens = tokens
        self.options = options
        self.progress = progress
        self.sent = 0  # bytes the server confirmed in this run
        self.client = TusClient(options.endpoint)
        self.uploader = FileUploader(
            stream,
            self.client,
            chunk_size=options.chunk_size,
            metadata=metadata_of(file, batch),
            checksum_algorithm=options.checksum_algorithm,
            timeout_s=options.timeout_s,
            on_sent=functools.partial(progress.file_sent, file),
        )
        self._must_resync = False

    def run(self, key: str, stored_url: str | None, state: ResumeState) -> FileResult:
        offset = self._resume(stored_url) if stored_url else None
        if offset is None:
            if stored_url:
                state.remove(key)
            url = self._call("create the upload", self.uploader.create_url)
            self.uploader.url = url
            state.put(key, url, self.file.path, is_done=False)
            offset = 0
        self.uploader.offset = offset
        self.progress.file_started(self.file, offset)
        while self.uploader.offset < self.file.size:
            self._call("upload", self._send_chunk)
        if not self._is_unchanged():
            state.remove(key)
            raise UploadFailed("the file changed while it was uploaded; run again to send it anew")
        detail = ""
        if self.options.verify_sha256:
            is_intact, detail = self._verify()
            if not is_intact:
                state.remove(key)  # the next run uploads it again
                raise UploadFailed(detail)
        state.put(key, self.uploader.url, self.file.path, is_done=True)
        return FileResult(self.file, "uploaded", self.sent, detail)

    def _resume(self, url: str) -> int | None:
        """The server's offset of a stored upload URL; None if the server no longer has it."""
        self.uploader.url = url
        try:
            headers = self._call("resume", self.uploader.head)
        except UploadFailed as error:
            if error.status not in GONE:
                raise
            self.progress.note(f"{self.file.relative_path}: the earlier upload is gone; anew")
            return None
        if headers.get("upload-length") not in (None, str(self.file.size)):
            return None  # a different upload: never append this file to it
        return offset_of(headers)

    def _send_chunk(self) -> None:
        if self._must_resync:  # after a failure, the server's offset is the truth
            self.uploader.offset = self.uploader.get_offset()
            self.progress.file_offset(self.file, self.uploader.offset)
        before = self.uploader.offset
        self._must_resync = True
        self.uploader.upload_chunk()
        self._must_resync = False
        self.sent += self.uploader.offset - before

    def _call(self, what: str, operation: Callable[[], T]) -> T:
        def send(auth_headers: dict[str, str]) -> T:
            self.client.headers = auth_headers
            return operation()

        def note(text: str) -> None:
            self.progress.note(f"{self.file.relative_path}: {text}")

        return call_with_retries(what, send, self.tokens, self.options.retry, note)

    def _is_unchanged(self) -> bool:
        try:
            info = os.stat(self.file.path)
        except OSError:
            return False
        return (info.st_size, info.st_mtime_ns) == (self.file.size, self.file.mtime_ns)

    def _verify(self) -> tuple[bool, str]:
        """Compare the server's SHA-256 (`Repr-Digest` on HEAD) with the local file's: False
        and why on a mismatch, else True and what was found.

        A server may hash a resumed upload after its last PATCH, so wait for the digest a
        little (longer for larger files); a server that never reports one is said so."""
        local = file_sha256(self.file.path)
        deadline = time.monotonic() + 2.0 + self.file.size / 200e6
        while True:
            remote = parse_repr_digest(self._call("verify", self.uploader.head).get("repr-digest"))
            if remote is not None:
                break
            if time.monotonic() > deadline:
                return True, "not verified: the server reports no SHA-256 (Repr-Digest)"
            time.sleep(0.1)
        if remote != local:
            return False, (
                f"SHA-256 mismatch: the server has {remote.hex()}, the file {local.hex()}; "
                "it will be uploaded anew on the next run"
            )
        return True, "SHA-256 verified"
