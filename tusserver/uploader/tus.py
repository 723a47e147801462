"""tuspy (the official tus client), fitted for `tusserver upload`.

tuspy's Uploader builds the protocol's requests: creation headers, Upload-Metadata encoding,
Tus-Resumable and client headers, reading a chunk at the offset, Upload-Checksum. tuspy 1.1
sends them without timeouts and reports nothing while a PATCH body streams, so the classes
here send the same requests with timeouts (a dropped network must end in an error, not a
hang), on one keep-alive session per file, with a body that counts bytes as they go.
Nothing here retries: every failure is raised as tuspy's TusCommunicationError with its
status, for the caller's policy.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http
import mimetypes
import os
import re
from collections.abc import Callable, Mapping
from typing import IO, Any
from urllib.parse import urljoin

import requests  # type: ignore[import-untyped, unused-ignore]
from tusclient import request as tus_request
from tusclient.client import TusClient
from tusclient.exceptions import TusCommunicationError, TusUploadFailed
from tusclient.uploader import uploader as tus_uploader

from tusserver.uploader.files import LocalFile

# tuspy is only partly annotated (it types some attributes as None), so its classes are used
# through Any here; what this module adds is fully typed.
_Uploader: Any = tus_uploader.Uploader
_TusRequest: Any = tus_request.TusRequest
_CommunicationError: Any = TusCommunicationError
_UploadFailedError: Any = TusUploadFailed

CONNECT_TIMEOUT_S = 15.0
_EXTRA_PHRASES = {460: "Checksum Mismatch"}
_OS_ERROR = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
_OS_ERROR_REPR = re.compile(r"\w+Error\(-?\d+, '([^']+)'\)")  # ConnectionResetError(104, '...')
_WRAPPED_MESSAGE = re.compile(r"\w+\('([^']+)'\)")  # RemoteDisconnected('Remote end closed ...')
_POOL_PREFIX = re.compile(r"^\w*ConnectionPool\([^)]*\): ")
_REPR_DIGEST_SHA256 = re.compile(r"(?:^|,)\s*sha-256\s*=\s*:([A-Za-z0-9+/]+=*):")


class UploadFailed(Exception):
    """A file that could not be uploaded; the message is one line for the user."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def describe_failure(error: TusCommunicationError) -> str:
    """One line for a failed request: the status, its phrase and the server's reason text."""
    status: int | None = error.status_code
    if status is None:
        return f"network error: {network_reason(str(error))}"
    try:
        phrase = http.HTTPStatus(status).phrase
    except ValueError:
        phrase = _EXTRA_PHRASES.get(status, "")
    content = error.response_content
    body = content.decode("utf-8", "replace") if isinstance(content, bytes) else ""
    body = " ".join(body.split())[:200]
    return f"{status} {phrase}" + (f": {body}" if body else "")


def network_reason(text: str) -> str:
    """The useful end of a requests/urllib3 error: `Connection refused`, not a page of
    wrapped exception reprs."""
    for pattern in (_OS_ERROR, _OS_ERROR_REPR, _WRAPPED_MESSAGE):
        match = pattern.search(text)
        if match:
            return match.group(1)
    return " ".join(_POOL_PREFIX.sub("", text).split())[:200]


def parse_repr_digest(value: str | None) -> bytes | None:
    """The SHA-256 in an RFC 9530 `Repr-Digest` value (`sha-256=:<base64>:`), else None."""
    match = _REPR_DIGEST_SHA256.search(value or "")
    if match is None:
        return None
    try:
        digest = base64.b64decode(match.group(1), validate=True)
    except ValueError:
        return None
    return digest if len(digest) == 32 else None


def server_checksum_algorithms(
    endpoint: str, auth_headers: Mapping[str, str], timeout_s: float
) -> frozenset[str]:
    """The checksum algorithms the server advertises on OPTIONS (empty if none or unknown).

    Raises UploadFailed with the reason when the server cannot be asked."""
    headers = {"Tus-Resumable": "1.0.0", **auth_headers}
    try:
        response = requests.options(
            endpoint, headers=headers, timeout=(CONNECT_TIMEOUT_S, timeout_s)
        )
    except requests.RequestException as error:
        raise UploadFailed(f"network error: {error}") from None
    extensions = {e.strip() for e in response.headers.get("Tus-Extension", "").split(",")}
    if response.status_code >= 400 or "checksum" not in extensions:
        return frozenset()
    algorithms = response.headers.get("Tus-Checksum-Algorithm", "")
    return frozenset(a.strip().lower() for a in algorithms.split(",") if a.strip())


# -- tuspy, with timeouts and streaming progress ------------------------------------------


class _CountingBody:
    """A request body that reports each block as the HTTP library reads it to send."""

    def __init__(self, data: bytes, on_sent: Callable[[int], None]) -> None:
        self._data = memoryview(data)
        self._position = 0
        self._on_sent = on_sent

    def __len__(self) -> int:  # lets requests send a Content-Length
        return len(self._data)

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else min(len(self._data), self._position + size)
        block = bytes(self._data[self._position : end])
        self._position = end
        if block:
            self._on_sent(len(block))
        return block


class StreamingRequest(_TusRequest):  # type: ignore[misc]
    """tuspy's PATCH request, sent with timeouts and a body that reports progress."""

    def __init__(self, uploader: FileUploader) -> None:
        super().__init__(uploader)
        self._session = uploader.session
        self._timeouts = uploader.timeouts
        self._on_sent = uploader.on_sent

    def perform(self) -> None:
        chunk = self.file.read(self._content_length)
        self.add_checksum(chunk)
        try:
            response = self._session.patch(
                self._url,
                data=_CountingBody(chunk, self._on_sent),
                headers=self._request_headers,
                timeout=self._timeouts,
                verify=self.verify_tls_cert,
                cert=self.client_cert,
            )
        except requests.RequestException as error:
            raise _UploadFailedError(error) from None
        self.status_code = response.status_code
        self.response_content = response.content
        self.response_headers = {k.lower(): v for k, v in response.headers.items()}


class FileUploader(_Uploader):  # type: ignore[misc]
    """tuspy's Uploader for one open file, with timeouts and a per-instance checksum."""

    def __init__(
        self,
        stream: IO[bytes],
        client: TusClient,
        *,
        chunk_size: int,
        metadata: dict[str, str],
        checksum_algorithm: str | None,
        timeout_s: float,
        on_sent: Callable[[int], None],
    ) -> None:
        if checksum_algorithm is not None:  # tuspy reads the pair once, in __init__
            self.CHECKSUM_ALGORITHM_PAIR = (
                checksum_algorithm,
                functools.partial(hashlib.new, checksum_algorithm),
            )
        super().__init__(
            file_stream=stream,
            client=client,
            chunk_size=chunk_size,
            metadata=metadata,
            upload_checksum=checksum_algorithm is not None,
        )
        self.timeouts = (CONNECT_TIMEOUT_S, timeout_s)
        self.on_sent = on_sent
        self.session = requests.Session()  # keep-alive across the chunks of the file

    def close(self) -> None:
        self.session.close()

    def create_url(self) -> str:
        """POST the creation request; the absolute upload URL."""
        try:
            response = self.session.post(
                self.client.url,
                headers=self.get_url_creation_headers(),
                timeout=self.timeouts,
                verify=self.verify_tls_cert,
                cert=self.client_cert,
            )
        except requests.RequestException as error:
            raise _CommunicationError(error) from None
        location = response.headers.get("Location")
        if not 200 <= response.status_code < 300 or not location:
            raise _CommunicationError("", response.status_code, response.content)
        return urljoin(str(self.client.url), str(location))

    def head(self) -> Mapping[str, str]:
        """The headers of a HEAD on the upload URL (raises TusCommunicationError unless 200)."""
        try:
            response = self.session.head(
                self.url,
                headers=self.get_headers(),
                timeout=self.timeouts,
                verify=self.verify_tls_cert,
                cert=self.client_cert,
            )
        except requests.RequestException as error:
            raise _CommunicationError(error) from None
        if response.status_code != 200:
            raise _CommunicationError("", response.status_code, response.content)
        return {k.lower(): v for k, v in response.headers.items()}

    def get_offset(self) -> int:
        return offset_of(self.head())

    def upload_chunk(self) -> None:
        """One PATCH of up to chunk_size bytes at the current offset (no retry here)."""
        request = StreamingRequest(self)
        request.perform()
        if not 200 <= request.status_code < 300:
            raise _UploadFailedError("", request.status_code, request.response_content)
        self.offset = offset_of(request.response_headers)


def offset_of(headers: Mapping[str, str]) -> int:
    value = headers.get("upload-offset", "")
    if not value.isdigit():
        raise UploadFailed("the server's answer has no Upload-Offset: is this a tus endpoint?")
    return int(value)


def metadata_of(file: LocalFile, batch: str | None = None) -> dict[str, str]:
    """Upload-Metadata: filename and relativePath (as tus-js-client and Uppy send them), and
    filetype when the name says it. In a batch, also `batch`, and relativePath is the path
    inside the folder that the batch holds. Names that are not UTF-8 get replacement
    characters."""

    def text(value: str) -> str:
        return os.fsencode(value).decode("utf-8", "replace")

    relative_path = file.relative_path if batch is None else file.path_in_folder
    metadata = {"filename": text(file.name), "relativePath": text(relative_path)}
    if batch is not None:
        metadata["batch"] = batch
    filetype, _ = mimetypes.guess_type(file.name)
    if filetype:
        metadata["filetype"] = filetype
    return metadata
