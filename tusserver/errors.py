"""The TusError family: one class per failure, each with its HTTP status and a short reason.

Status numbers of refusals live here and nowhere else. One middleware (app.py) renders a
TusError as a plain-text response whose body is the reason.
"""

from __future__ import annotations

from collections.abc import Mapping


class TusError(Exception):
    """A refusal the client should see: `status`, a one-line `reason`, extra `headers`."""

    status = 400
    # An RFC 9457 problem body (the resumable-upload draft's problem types): rendered as
    # `application/problem+json` instead of the plain-text reason.
    problem: dict[str, object] | None = None

    def __init__(self, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(TusError):
    """A malformed or contradictory request header or body (400)."""

    status = 400


class Interrupted(TusError):
    """A PATCH stopped because another request took the upload over (400, not 5xx: a 5xx
    would make the old client retry and fight the new one)."""

    status = 400

    def __init__(self, committed_offset: int) -> None:
        super().__init__(
            "this PATCH was interrupted by a newer request for the same upload; "
            f"{committed_offset} bytes are committed",
            {"Upload-Offset": str(committed_offset)},
        )


class BodyIncomplete(TusError):
    """The client stopped sending before the body's end; what arrived is kept (400)."""

    status = 400


class Unauthorized(TusError):
    """A missing, malformed, forged or expired token (401)."""

    status = 401

    def __init__(self, reason: str) -> None:
        super().__init__(reason, {"WWW-Authenticate": 'Bearer realm="tusserver"'})


class Forbidden(TusError):
    """The request is understood but not allowed (403)."""

    status = 403


class UploadNotFound(TusError):
    """No such upload, or not one the requester may know about (404)."""

    status = 404

    def __init__(self, reason: str = "no such upload") -> None:
        super().__init__(reason)


class MethodNotAllowed(TusError):
    """The resource exists but does not answer this method (405)."""

    status = 405

    def __init__(self, method: str, allowed: str) -> None:
        super().__init__(f"{method} is not allowed here", {"Allow": allowed})


class RequestTimeout(TusError):
    """The body stalled longer than --idle-timeout; what arrived is kept (408)."""

    status = 408


class Conflict(TusError):
    """The request does not fit the upload's current state (409)."""

    status = 409


class OffsetMismatch(Conflict):
    """Upload-Offset differs from the committed offset (409, with the right offset)."""

    def __init__(self, expected: int, got: int) -> None:
        self.expected = expected
        self.got = got
        super().__init__(
            f"Upload-Offset is {got}, the upload is at {expected}",
            {"Upload-Offset": str(expected)},
        )


class UploadGone(TusError):
    """The upload was terminated or expired; its owner learns so while a tombstone lasts.

    410 here; the error middleware answers --gone-status instead (404 by default: the mobile
    tus clients start over only on 404), with this reason in the body either way."""

    status = 410

    def __init__(self, reason: str = "this upload was terminated or has expired") -> None:
        super().__init__(reason)


class PreconditionFailed(TusError):
    """A missing or unsupported Tus-Resumable version (412, with Tus-Version)."""

    status = 412

    def __init__(self, reason: str, supported_versions: str) -> None:
        super().__init__(reason, {"Tus-Version": supported_versions})


class PayloadTooLarge(TusError):
    """Over Tus-Max-Size, a token's maximum size, or past Upload-Length (413)."""

    status = 413


class UnsupportedMediaType(TusError):
    """A PATCH body that is not application/offset+octet-stream (415)."""

    status = 415


class UploadLocked(TusError):
    """Another request holds the upload and did not let go in time (423)."""

    status = 423

    def __init__(self) -> None:
        super().__init__("another request is using this upload; retry shortly")


class ChecksumMismatch(TusError):
    """Upload-Checksum did not match the bytes received; none were kept (460)."""

    status = 460

    def __init__(self, algorithm: str) -> None:
        super().__init__(f"the {algorithm} checksum does not match the body; nothing was kept")


class ServiceUnavailable(TusError):
    """Redis is unreachable or the server is shutting down (503, with Retry-After)."""

    status = 503

    def __init__(self, reason: str, retry_after_s: int = 5) -> None:
        super().__init__(reason, {"Retry-After": str(retry_after_s)})


class InsufficientStorage(TusError):
    """The disk is full or below --min-free-disk (507)."""

    status = 507


class StorageFailure(TusError):
    """The disk refused a write for another reason (500, with a reason that names no path)."""

    status = 500
