"""Pure tus 1.0.0 header parsing and formatting: no I/O, no request objects.

Parsers take the raw header value (``None`` when the header is absent) and return a value or
raise a `TusError` (400, 412 or 415) whose reason names the header. Formatters take values the
server made itself and raise `ValueError` on misuse, which is a bug, not a client error.
Surrounding spaces and tabs are ignored everywhere, as HTTP allows.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from email.utils import formatdate
from urllib.parse import quote, urlsplit

from tusserver.errors import (
    BadRequest,
    ChecksumMismatch,
    PreconditionFailed,
    UnsupportedMediaType,
)

TUS_VERSION = "1.0.0"
SUPPORTED_VERSIONS: tuple[str, ...] = ("1.0.0",)
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
CHECKSUM_ALGORITHMS: tuple[str, ...] = ("md5", "sha1", "sha256", "sha512")
MAX_METADATA_BYTES = 64 * 1024
MAX_CONCAT_BYTES = 64 * 1024
MAX_INTEGER = 2**63 - 1
OVERRIDABLE_METHODS: frozenset[str] = frozenset(
    {"PATCH", "DELETE", "HEAD", "GET", "POST", "OPTIONS"}
)
SAFE_CONTENT_TYPES: frozenset[str] = frozenset(
    {
        "image/png", "image/jpeg", "image/gif", "image/webp", "image/avif",
        "video/mp4", "video/webm", "audio/mpeg", "audio/ogg", "audio/wav",
        "application/pdf", "application/zip", "application/gzip",
        "text/plain", "text/csv", "application/json", "application/octet-stream",
    }
)  # fmt: skip

_DIGEST_SIZES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}
_OWS = " \t"
_DIGITS = re.compile(r"[0-9]+")
_METADATA_KEY = re.compile(r"[\x21-\x2b\x2d-\x7e]+")  # printable ASCII but space and comma
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_URL = re.compile(r"[\x21-\x7e]+")
_TEXT_TYPES = frozenset({"text/plain", "text/csv"})
# RFC 5987 attr-char, less the letters, digits and "-._~" that quote() always keeps.
_ATTR_CHAR_EXTRA = "!#$&+^`|"


@dataclass(frozen=True)
class Concat:
    """An Upload-Concat header: a partial upload, or a final one made of `partial_paths`."""

    is_final: bool
    partial_paths: tuple[str, ...]


@dataclass(frozen=True)
class Checksum:
    """An Upload-Checksum header: a lower-case algorithm of CHECKSUM_ALGORITHMS and its digest."""

    algorithm: str
    digest: bytes


def check_tus_resumable(value: str | None) -> None:
    """Return if Tus-Resumable names a supported version.

    Raises PreconditionFailed (412, with Tus-Version) if it is missing or unsupported.
    """
    supported = ",".join(SUPPORTED_VERSIONS)
    if value is None:
        raise PreconditionFailed("Tus-Resumable header is required", supported)
    if value.strip(_OWS) not in SUPPORTED_VERSIONS:
        raise PreconditionFailed(f"Tus-Resumable must be one of {supported}", supported)


def _parse_integer(value: str, header: str) -> int:
    digits = value.strip(_OWS)
    if not _DIGITS.fullmatch(digits):
        raise BadRequest(f"{header} must be a non-negative decimal integer")
    # Bound the digit count before int() so no huge number is ever built.
    if len(digits.lstrip("0")) > len(str(MAX_INTEGER)) or int(digits) > MAX_INTEGER:
        raise BadRequest(f"{header} must be at most {MAX_INTEGER}")
    return int(digits)


def parse_upload_length(value: str | None) -> int | None:
    """Return Upload-Length as an int in [0, 2**63-1], or None if the header is absent.

    Raises BadRequest (400) unless the value is ASCII digits only.
    """
    return None if value is None else _parse_integer(value, "Upload-Length")


def parse_defer_length(value: str | None) -> bool:
    """Return True if Upload-Defer-Length is "1", False if absent; BadRequest (400) otherwise."""
    if value is None:
        return False
    if value.strip(_OWS) != "1":
        raise BadRequest('Upload-Defer-Length must be "1"')
    return True


def parse_upload_offset(value: str | None) -> int:
    """Return Upload-Offset as an int in [0, 2**63-1].

    Raises BadRequest (400) if the header is missing or not ASCII digits only.
    """
    if value is None:
        raise BadRequest("Upload-Offset header is required")
    return _parse_integer(value, "Upload-Offset")


def _check_size(value: str, limit: int, header: str) -> None:
    if len(value) > limit or len(value.encode("utf-8", "surrogatepass")) > limit:
        raise BadRequest(f"{header} is longer than {limit} bytes")


def _decode_base64(text: str, what: str) -> bytes:
    """Decode standard base64, padded or not; BadRequest (400) naming `what` otherwise."""
    if not _BASE64.fullmatch(text) or len(text) % 4 == 1 or ("=" in text and len(text) % 4):
        raise BadRequest(f"{what} is not valid base64")
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise BadRequest(f"{what} is not valid base64") from None


def parse_metadata(value: str | None) -> dict[str, bytes | None]:
    """Return Upload-Metadata as {key: decoded value}; {} if absent or empty.

    Pairs are "key base64value", comma-separated. A key alone maps to None; a key followed by a
    space and nothing maps to b"". Raises BadRequest (400) for an empty pair, a key that is
    not printable ASCII without spaces and commas, a duplicate key, a value that is not base64,
    or a header longer than MAX_METADATA_BYTES.
    """
    if value is None:
        return {}
    _check_size(value, MAX_METADATA_BYTES, "Upload-Metadata")
    if not value.strip(_OWS):
        return {}
    metadata: dict[str, bytes | None] = {}
    for pair in value.split(","):
        key, space, encoded = pair.lstrip(_OWS).partition(" ")
        if not space:
            key = key.rstrip(_OWS)
        if not key:
            raise BadRequest("Upload-Metadata has an empty pair or an empty key")
        if not _METADATA_KEY.fullmatch(key):
            raise BadRequest("Upload-Metadata keys must be printable ASCII without spaces")
        if key in metadata:
            raise BadRequest(f"Upload-Metadata has the key {key!r} twice")
        metadata[key] = (
            _decode_base64(encoded.strip(_OWS), f"Upload-Metadata value of {key!r}")
            if space
            else None
        )
    return metadata


def format_metadata(metadata: Mapping[str, bytes | None]) -> str:
    """Return the Upload-Metadata value that parse_metadata turns back into `metadata`.

    Raises ValueError for a key parse_metadata would refuse.
    """
    pairs = []
    for key, data in metadata.items():
        if not _METADATA_KEY.fullmatch(key):
            raise ValueError(f"invalid Upload-Metadata key {key!r}")
        pairs.append(key if data is None else f"{key} {base64.b64encode(data).decode('ascii')}")
    return ",".join(pairs)


def _url_path(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        raise BadRequest("Upload-Concat has a malformed URL") from None
    if parts.scheme:
        is_valid = parts.scheme.lower() in ("http", "https") and bool(parts.netloc)
    else:
        is_valid = not parts.netloc
    if not is_valid or not parts.path.startswith("/"):
        raise BadRequest("Upload-Concat URLs must be http(s) URLs or absolute paths")
    return parts.path


def parse_concat(value: str | None) -> Concat | None:
    """Return Upload-Concat as a Concat, or None if the header is absent.

    "partial" gives a partial upload; "final;<url> <url> ..." a final one with the URLs' paths
    (percent-encoding kept, query and fragment dropped). Raises BadRequest (400) for anything
    else, a final without URLs, a URL that is neither http(s) nor an absolute path, or a header
    longer than MAX_CONCAT_BYTES.
    """
    if value is None:
        return None
    _check_size(value, MAX_CONCAT_BYTES, "Upload-Concat")
    text = value.strip(_OWS)
    if text == "partial":
        return Concat(is_final=False, partial_paths=())
    kind, semicolon, urls = text.partition(";")
    if kind != "final" or not semicolon:
        raise BadRequest('Upload-Concat must be "partial" or "final;<url> <url> ..."')
    words = urls.split(" ")
    if not all(_URL.fullmatch(url) for url in words if url):
        raise BadRequest("Upload-Concat URLs must be printable ASCII separated by spaces")
    paths = tuple(_url_path(url) for url in words if url)
    if not paths:
        raise BadRequest("Upload-Concat final must list at least one partial upload")
    return Concat(is_final=True, partial_paths=paths)


def format_concat(concat: Concat, urls: Sequence[str]) -> str:
    """Return the Upload-Concat value: "partial", or "final;" and `urls` space-separated.

    Raises ValueError for a final without URLs or a URL with spaces or non-printable bytes.
    """
    if not concat.is_final:
        return "partial"
    if not urls or not all(_URL.fullmatch(url) for url in urls):
        raise ValueError("a final Upload-Concat needs URLs of printable ASCII without spaces")
    return "final;" + " ".join(urls)


def parse_checksum(value: str | None) -> Checksum | None:
    """Return Upload-Checksum ("<algorithm> <base64 digest>"), or None if the header is absent.

    Raises BadRequest (400) for another shape, an algorithm outside CHECKSUM_ALGORITHMS, or a
    digest that is not base64; ChecksumMismatch (460) for a digest not of the algorithm's
    length, which no body can match.
    """
    if value is None:
        return None
    algorithm, space, encoded = value.strip(_OWS).partition(" ")
    if not space:
        raise BadRequest("Upload-Checksum must be '<algorithm> <base64 digest>'")
    algorithm = algorithm.lower()
    if algorithm not in _DIGEST_SIZES:
        raise BadRequest(
            f"unsupported checksum algorithm {algorithm[:32]!r}; "
            f"supported: {', '.join(CHECKSUM_ALGORITHMS)}"
        )
    digest = _decode_base64(encoded.strip(_OWS), "Upload-Checksum digest")
    if len(digest) != _DIGEST_SIZES[algorithm]:
        raise ChecksumMismatch(algorithm)  # no body can match it: refused before it is read
    return Checksum(algorithm=algorithm, digest=digest)


def _media_type(content_type: str | None) -> str:
    return "" if content_type is None else content_type.split(";", 1)[0].strip(_OWS).lower()


def has_offset_stream(content_type: str | None) -> bool:
    """Return whether the media type (parameters ignored) is application/offset+octet-stream."""
    return _media_type(content_type) == OFFSET_CONTENT_TYPE


def require_offset_stream(content_type: str | None) -> None:
    """Return if has_offset_stream(content_type); raise UnsupportedMediaType (415) otherwise."""
    if not has_offset_stream(content_type):
        raise UnsupportedMediaType(f"Content-Type must be {OFFSET_CONTENT_TYPE}")


def require_identity_encoding(content_encoding: str | None) -> None:
    """Return if the body is sent as it is (no Content-Encoding, or `identity`); raise
    UnsupportedMediaType (415) otherwise: an upload's bytes are raw, and a decompressed body
    would not be the bytes the client's offsets count."""
    if content_encoding is None:
        return
    codings = [c.strip(_OWS).lower() for c in content_encoding.split(",") if c.strip(_OWS)]
    if any(coding != "identity" for coding in codings):
        raise UnsupportedMediaType("Content-Encoding is not accepted: send the bytes as they are")


# Headers of the protocol that carry one value: a request that sends one twice with different
# values is ambiguous (which one would the server use?), so it is refused.
SINGLE_VALUE_HEADERS = (
    "Tus-Resumable",
    "Upload-Offset",
    "Upload-Length",
    "Upload-Defer-Length",
    "Upload-Metadata",
    "Upload-Concat",
    "Upload-Checksum",
    "Content-Type",
    "Content-Encoding",
    "X-HTTP-Method-Override",
)


def check_single_values(values_of: Callable[[str], list[str]]) -> None:
    """Raise BadRequest (400) if a SINGLE_VALUE_HEADERS header comes with two different
    values; `values_of(name)` gives every value sent for `name`."""
    for name in SINGLE_VALUE_HEADERS:
        if len(set(values_of(name))) > 1:
            raise BadRequest(f"{name} is sent more than once, with different values")


_LIST_LIMIT = re.compile(r"[0-9]{1,7}")
_LIST_CURSOR = re.compile(r"([0-9]{1,12}\.[0-9]{6})_([0-9a-f]{32})")


def parse_list_limit(value: str | None, default: int, maximum: int) -> int:
    """A listing's `?limit=`: ASCII digits from 1 to `maximum` (`default` when absent);
    BadRequest (400) otherwise."""
    if value is None:
        return default
    if not _LIST_LIMIT.fullmatch(value) or not 1 <= int(value) <= maximum:
        raise BadRequest(f"limit must be a whole number from 1 to {maximum}")
    return int(value)


def parse_list_cursor(value: str | None) -> tuple[float, str] | None:
    """A listing's `?cursor=` as given out (`<created>_<upload id>`); None when absent or
    empty; BadRequest (400) for anything else."""
    if not value:
        return None
    match = _LIST_CURSOR.fullmatch(value)
    if match is None:
        raise BadRequest("cursor is not one this server gave out")
    return float(match.group(1)), match.group(2)


def format_list_cursor(created_at: float, upload_id: str) -> str:
    return f"{created_at:.6f}_{upload_id}"


_SCHEMES = frozenset({"http", "https"})
_PREFIX = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)*")


def endpoint_template(scheme: str, host: str, prefix: str, base_path: str) -> str:
    """The absolute URL of the endpoint with an `{id}` placeholder, from the request's (or a
    proxy's) scheme, host and path prefix; BadRequest (400) for a scheme other than http(s),
    a host that is not an ASCII name or IP literal with an optional port, or a prefix that is
    not a plain path."""
    scheme = scheme.split(",")[0].strip(_OWS).lower()
    host = host.split(",")[0].strip(_OWS)
    prefix = prefix.strip(_OWS).rstrip("/")
    if scheme not in _SCHEMES:
        raise BadRequest("the request's scheme must be http or https")
    if not split_host(host)[0]:
        raise BadRequest("the Host header is not a host name or address")
    if not _PREFIX.fullmatch(prefix):
        raise BadRequest("X-Forwarded-Prefix is not a plain path")
    return f"{scheme}://{host}{prefix}{base_path}{{id}}"


_HOST = re.compile(r"([A-Za-z0-9.\-]+|\[[0-9A-Fa-f:.]+\])(?::([1-9][0-9]{0,4}))?")


def split_host(host: str) -> tuple[str, str]:
    """A Host header's name and port ("" when absent); ("", "") when it is not an ASCII
    host name or IP literal with an optional port from 1 to 65535 written plainly (no
    leading zero), so a URL built from it names one place only."""
    match = _HOST.fullmatch(host)
    if match is None or (match.group(2) and int(match.group(2)) > 65535):
        return "", ""
    return match.group(1), match.group(2) or ""


MAX_REQUEST_ID_LENGTH = 128
# The id of the request being served (set by the request-id middleware for the request's
# task and what it starts); the store writes it into the events that request causes, "" for
# events nobody asked for (expiry, a hash finished by the sweeper).
current_request_id: ContextVar[str] = ContextVar("current_request_id", default="")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1," + str(MAX_REQUEST_ID_LENGTH) + r"}\Z")


def parse_request_id(value: str | None) -> str | None:
    """The client's X-Request-Id when it is safe to echo and log as it is: 1 to 128 token
    characters (RFC 9110: letters, digits and !#$%&'*+-.^_`|~); None otherwise (absent,
    empty, too long, spaces, quotes, control or non-ASCII characters)."""
    if value is None or _REQUEST_ID.match(value) is None:
        return None
    return value


def parse_method_override(value: str | None) -> str | None:
    """Return X-HTTP-Method-Override upper-cased, or None if the header is absent.

    Raises BadRequest (400) unless it is one of OVERRIDABLE_METHODS.
    """
    if value is None:
        return None
    method = value.strip(_OWS).upper()
    if method not in OVERRIDABLE_METHODS:
        raise BadRequest(
            f"X-HTTP-Method-Override must be one of {', '.join(sorted(OVERRIDABLE_METHODS))}"
        )
    return method


def metadata_text(metadata: Mapping[str, bytes | None]) -> dict[str, str | None]:
    """Metadata values as text (UTF-8, undecodable bytes replaced), for JSON bodies: the
    listing, form answers and the parent's events."""
    return {
        key: None if value is None else value.decode("utf-8", errors="replace")
        for key, value in metadata.items()
    }


def format_http_date(epoch_s: float) -> str:
    """Return `epoch_s` as an RFC 9110 IMF-fixdate, e.g. "Sun, 06 Nov 1994 08:49:37 GMT"."""
    return _format_http_second(int(epoch_s))


@functools.lru_cache(maxsize=64)
def _format_http_second(epoch_s: int) -> str:
    # Uploads created within one second expire within one: their dates are formatted once.
    return formatdate(epoch_s, usegmt=True)


def format_repr_digest(sha256: bytes) -> str:
    """Return the RFC 9530 Repr-Digest value "sha-256=:<base64>:"; ValueError unless 32 bytes."""
    if len(sha256) != 32:
        raise ValueError("a SHA-256 digest is 32 bytes long")
    return f"sha-256=:{base64.b64encode(sha256).decode('ascii')}:"


def _safe_char(char: str) -> str:
    # Control, format (e.g. U+202E right-to-left override) and unassigned characters, and
    # path separators, never reach a saved file name.
    return "_" if char in "/\\" or unicodedata.category(char).startswith("C") else char


def content_disposition(filename: str | None) -> str:
    """Return a Content-Disposition value: "attachment", plus the file name if one is given.

    The name (at most 255 characters) appears twice: as an ASCII filename="..." fallback with
    quotes, backslashes, "%", path separators, control and non-ASCII characters replaced by
    "_", and as an RFC 5987 filename*=UTF-8''... The value is always printable ASCII.
    """
    name = "".join(_safe_char(char) for char in (filename or "")[:255])
    if not name:
        return "attachment"
    fallback = "".join(char if " " <= char <= "~" and char not in '"%' else "_" for char in name)
    encoded = quote(name, safe=_ATTR_CHAR_EXTRA, encoding="utf-8")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


def download_content_type(filetype: str | None) -> str:
    """Return the Content-Type to serve a download with.

    That is the lower-cased media type of `filetype` when it is in SAFE_CONTENT_TYPES (text
    types with "; charset=utf-8"), and application/octet-stream for anything else, so a
    download never renders as HTML or script in the server's origin.
    """
    media_type = _media_type(filetype)
    if media_type not in SAFE_CONTENT_TYPES:
        return "application/octet-stream"
    return f"{media_type}; charset=utf-8" if media_type in _TEXT_TYPES else media_type
