"""The IETF resumable-upload draft (draft-ietf-httpbis-resumable-upload), pure: which requests
speak it, what each interop version means, and its header fields and problem bodies. No I/O.

A request with `Tus-Resumable` is tus 1.0.0, whatever else it carries (iOS adds draft fields
to tus PATCHes). One without it that carries `Upload-Draft-Interop-Version`, `Upload-Complete`
or version 3's `Upload-Incomplete` is the draft; without an interop version it follows the
newest text (a client written to the final RFC sends none).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote

from tusserver.errors import BadRequest, TusError
from tusserver.protocol import MAX_INTEGER, Checksum, parse_metadata

INTEROP_HEADER = "Upload-Draft-Interop-Version"
PARTIAL_UPLOAD = "application/partial-upload"
PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
# RFC 9530 algorithm names this server verifies, strongest first, and their hashlib names.
DIGEST_ALGORITHMS = {"sha-512": "sha512", "sha-256": "sha256"}
_DIGEST_SIZES = {"sha512": 64, "sha256": 32}
_SF_INTEGER = re.compile(r"-?[0-9]{1,15}")
_SF_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")


@dataclass(frozen=True)
class Version:
    """What one interop version of the draft says, where the versions differ."""

    interop: int | None  # None: a request without an interop version (the newest text)
    complete_field: str  # the completeness field: `Upload-Complete`, or v3's `Upload-Incomplete`
    is_inverted: bool  # the field says "incomplete" (v3): ?1 means not complete
    requires_partial_upload: bool  # appends must be `application/partial-upload` (-04 on)
    lifetime_key: str | None  # `Upload-Limit`'s lifetime key; None: no `Upload-Limit` (< -04)
    refuses_upload_fields: bool  # HEAD and DELETE carrying upload fields are refused (400)


# One row per interop version this server speaks (the texts of drafts -01, -03, -05, -09
# and the newest): where each differs, its own text is followed.
VERSIONS: dict[int, Version] = {
    3: Version(3, "Upload-Incomplete", True, False, None, True),
    5: Version(5, "Upload-Complete", False, False, None, True),
    6: Version(6, "Upload-Complete", False, True, "expires", False),
    8: Version(8, "Upload-Complete", False, True, "max-age", False),
    9: Version(9, "Upload-Complete", False, True, "max-age", False),
}
NEWEST = Version(None, "Upload-Complete", False, True, "max-age", False)
SUPPORTED = ", ".join(str(number) for number in VERSIONS)


def classify(headers: Mapping[str, str]) -> Version | None:
    """The draft version a request speaks, or None for tus 1.0.0 (a request with
    `Tus-Resumable`, or one with none of the draft's fields). BadRequest (400) for an interop
    version this server does not speak."""
    if headers.get("Tus-Resumable") is not None:
        return None
    interop = headers.get(INTEROP_HEADER)
    if interop is not None:
        number = parse_sf_integer(interop)
        if number is None or number not in VERSIONS:
            raise BadRequest(f"{INTEROP_HEADER} must be one of {SUPPORTED}")
        return VERSIONS[number]
    if headers.get("Upload-Complete") is not None:
        return NEWEST
    if headers.get("Upload-Incomplete") is not None:
        return VERSIONS[3]
    return None


# -- Structured Field items (RFC 9651) ------------------------------------------------------


def parse_sf_boolean(value: str | None) -> bool | None:
    """`?1` -> True, `?0` -> False; None for anything else (the draft ignores such a field)."""
    if value is None:
        return None
    text = value.strip(" \t")
    return {"?1": True, "?0": False}.get(text)


def format_sf_boolean(value: bool) -> str:
    return "?1" if value else "?0"


def parse_sf_integer(value: str | None) -> int | None:
    """A Structured Field Integer (at most 15 digits), or None for anything else."""
    if value is None:
        return None
    text = value.strip(" \t")
    return int(text) if _SF_INTEGER.fullmatch(text) else None


def parse_non_negative(value: str | None, field: str) -> int | None:
    """An `Upload-Offset` or `Upload-Length` value: None if absent; 400 if not a non-negative
    Integer (the draft would ignore the field; refusing says why instead of guessing)."""
    if value is None:
        return None
    number = parse_sf_integer(value)
    if number is None or number < 0 or number > MAX_INTEGER:
        raise BadRequest(f"{field} must be a non-negative integer")
    return number


# -- completeness ---------------------------------------------------------------------------


def parse_complete(version: Version, headers: Mapping[str, str]) -> bool | None:
    """Whether the request completes the upload, from the version's completeness field;
    None when the field is absent. 400 for a value that is not a Boolean."""
    value = headers.get(version.complete_field)
    if value is None:
        return None
    flag = parse_sf_boolean(value)
    if flag is None:
        raise BadRequest(f"{version.complete_field} must be ?0 or ?1")
    return not flag if version.is_inverted else flag


def require_complete(version: Version, headers: Mapping[str, str]) -> bool:
    """`parse_complete` for creations and appends, where the field is required (400)."""
    complete = parse_complete(version, headers)
    if complete is None:
        raise BadRequest(f"{version.complete_field} (?0 or ?1) is required")
    return complete


def complete_headers(version: Version, is_complete: bool) -> dict[str, str]:
    """The completeness field of a response (and the interop version, when one was sent)."""
    flag = not is_complete if version.is_inverted else is_complete
    headers = {version.complete_field: format_sf_boolean(flag)}
    if version.interop is not None:
        headers[INTEROP_HEADER] = str(version.interop)
    return headers


def check_no_upload_fields(version: Version, headers: Mapping[str, str]) -> None:
    """Versions 3 and 5 refuse an offset retrieval or a cancellation that carries
    `Upload-Offset` or the completeness field (400)."""
    if not version.refuses_upload_fields:
        return
    for field in ("Upload-Offset", version.complete_field):
        if headers.get(field) is not None:
            raise BadRequest(f"this request must not carry {field}")


def is_partial_upload(content_type: str | None) -> bool:
    media = "" if content_type is None else content_type.split(";", 1)[0].strip(" \t").lower()
    return media == PARTIAL_UPLOAD


# -- length ---------------------------------------------------------------------------------


def resolved_length(
    upload_length: int | None, is_complete: bool, content_length: int | None, offset: int
) -> int | None:
    """The length a creation or append declares: `Upload-Length`, and with the completeness
    field true and a known `Content-Length`, the offset plus that; both must agree (400,
    inconsistent length). None when the request declares none."""
    from_content = offset + content_length if is_complete and content_length is not None else None
    if upload_length is not None and from_content is not None and upload_length != from_content:
        raise InconsistentLength("Upload-Length differs from the offset plus Content-Length")
    return upload_length if upload_length is not None else from_content


# -- Upload-Limit ---------------------------------------------------------------------------


def format_limits(
    version: Version, *, max_size: int | None, lifetime_s: float | None
) -> str | None:
    """`Upload-Limit` for `version` (None: the version has no such field): `max-size` and the
    lifetime under the version's key (`expires` or `max-age`); `min-size=0` when there is no
    limit at all, as the draft requires instead of an empty value."""
    if version.lifetime_key is None:
        return None
    members = []
    if max_size is not None:
        members.append(f"max-size={max_size}")
    if lifetime_s is not None:
        members.append(f"{version.lifetime_key}={max(0, int(lifetime_s))}")
    return ", ".join(members) or "min-size=0"


def parse_limits(value: str) -> dict[str, int]:
    """An `Upload-Limit` Dictionary of Integers (what a client reads; used by tests)."""
    limits: dict[str, int] = {}
    for member in value.split(","):
        key, _, number = member.strip(" \t").partition("=")
        parsed = parse_sf_integer(number)
        if not _SF_KEY.fullmatch(key) or parsed is None:
            raise ValueError(f"not an Upload-Limit member: {member!r}")
        limits[key] = parsed
    return limits


# -- digests (RFC 9530) ---------------------------------------------------------------------


def parse_digest(value: str | None, field: str) -> Checksum | None:
    """The strongest digest this server verifies in a `Content-Digest` or `Repr-Digest`
    Dictionary (`sha-256=:<base64>:`); None if absent or naming only other algorithms (RFC
    9530 lets a recipient ignore those). 400 for a malformed value; a digest of the wrong
    size for its algorithm matches no body (DigestMismatch)."""
    if value is None:
        return None
    found: dict[str, str] = {}
    for member in value.split(","):
        key, equals, item = member.strip(" \t").partition("=")
        key = key.strip(" \t").lower()
        if not equals or not _SF_KEY.fullmatch(key):
            raise BadRequest(f"{field} must be a Dictionary of algorithm=:base64:")
        found[key] = item.split(";", 1)[0].strip(" \t")
    for name, algorithm in DIGEST_ALGORITHMS.items():
        if name not in found:
            continue
        item = found[name]
        if len(item) < 2 or item[0] != ":" or item[-1] != ":":
            raise BadRequest(f"{field} {name} must be a Byte Sequence (:base64:)")
        try:
            digest = base64.b64decode(item[1:-1], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{field} {name} is not valid base64") from None
        if len(digest) != _DIGEST_SIZES[algorithm]:
            raise DigestMismatch(field)
        return Checksum(algorithm=algorithm, digest=digest)
    return None


def request_digest(headers: Mapping[str, str], *, is_whole_representation: bool) -> Checksum | None:
    """The digest a request's content must match: `Content-Digest`, or `Repr-Digest` when the
    content is the whole representation (an upload created, or appended from offset 0, and
    completed in one request); a `Repr-Digest` of part of an upload is not checked."""
    content = parse_digest(headers.get("Content-Digest"), "Content-Digest")
    if content is not None:
        return content
    if is_whole_representation:
        return parse_digest(headers.get("Repr-Digest"), "Repr-Digest")
    return None


# -- problem types (RFC 9457) ---------------------------------------------------------------


class InconsistentLength(BadRequest):
    """The request's length indicators disagree with each other or with the upload (400,
    problem type inconsistent-upload-length)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.problem = {
            "type": PROBLEM_TYPES + "inconsistent-upload-length",
            "title": "inconsistent length values for upload",
            "detail": reason,
        }


class CompletedUpload(BadRequest):
    """Content appended to an upload that is already complete (400, completed-upload)."""

    def __init__(self) -> None:
        super().__init__("this upload is already complete")
        self.problem = {
            "type": PROBLEM_TYPES + "completed-upload",
            "title": "upload is already completed",
        }


class DigestMismatch(TusError):
    """A `Content-Digest` or `Repr-Digest` that the content does not match; nothing of it
    is kept (400: the draft has no status of its own for it, and tus's 460 is tus's)."""

    status = 400

    def __init__(self, field: str) -> None:
        super().__init__(f"the content does not match its {field}; nothing was kept")


def mismatching_offset_problem(expected: int, provided: int) -> dict[str, object]:
    """The body of a 409 for an `Upload-Offset` that is not the upload's."""
    return {
        "type": PROBLEM_TYPES + "mismatching-upload-offset",
        "title": "offset from request does not match offset of resource",
        "expected-offset": expected,
        "provided-offset": provided,
    }


# -- representation metadata of a creation ----------------------------------------------------

_FILENAME_EXT = re.compile(r"filename\*\s*=\s*(?:UTF-8|utf-8)''([^;\s]+)")
_FILENAME = re.compile(r'filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))')


def metadata_of(content_type: str | None, disposition: str | None) -> dict[str, bytes | None]:
    """The upload's metadata from a creation's representation fields, as tus clients name
    them: `filetype` from `Content-Type`, `filename` from `Content-Disposition`."""
    metadata: dict[str, bytes | None] = {}
    media = "" if content_type is None else content_type.split(";", 1)[0].strip(" \t").lower()
    if media and media != PARTIAL_UPLOAD:
        metadata["filetype"] = media.encode()
    if disposition is not None:
        extended = _FILENAME_EXT.search(disposition)
        plain = _FILENAME.search(disposition)
        if extended is not None:
            metadata["filename"] = unquote(extended.group(1)).encode()
        elif plain is not None:
            name = plain.group(1) if plain.group(1) is not None else plain.group(2)
            metadata["filename"] = re.sub(r"\\(.)", r"\1", name).encode()
    return metadata


def creation_metadata(headers: Mapping[str, str]) -> dict[str, bytes | None]:
    """A creation's metadata: tus's `Upload-Metadata` where the client sends it (tus-js-client
    does in its draft modes), and `filetype`/`filename` from the representation fields where
    it names neither. 400 for a malformed `Upload-Metadata`."""
    named = parse_metadata(headers.get("Upload-Metadata"))
    return metadata_of(headers.get("Content-Type"), headers.get("Content-Disposition")) | named
