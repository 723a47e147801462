"""Signed access tokens: a parent service issues them, tusserver verifies them on its own.

A token is an itsdangerous URLSafeSerializer string (salt TOKEN_SALT, HMAC-SHA1) over a JSON
payload that carries its own expiry; docs/tokens.md describes the format byte by byte. Without
a configured secret (development mode) every request gets ANONYMOUS.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TypeGuard

from itsdangerous import BadPayload, BadSignature, URLSafeSerializer, base64_encode

from tusserver.errors import Forbidden, Unauthorized, UploadNotFound

ACTIONS: frozenset[str] = frozenset({"create", "upload", "read", "delete"})
TOKEN_SALT = "tusserver.token.v1"  # noqa: S105 (a salt, public by design)
DEFAULT_LEEWAY_S = 30.0

ACTIONS_FOR_METHOD: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "POST": ("create",),
        "PATCH": ("upload",),
        "HEAD": ("upload", "read"),
        "GET": ("read",),
        "DELETE": ("delete",),
    }
)

_ACTION_ORDER = ("create", "upload", "read", "delete")  # fixed order keeps tokens reproducible
_QUERY_TOKEN_METHODS = frozenset({"GET", "HEAD"})
# What a token with the `fin` claim may still do after its `exp`, for the upload it created.
FINISHING_METHODS = frozenset({"HEAD", "PATCH", "DELETE"})
EXPIRED = "token expired"
# payload part (a leading "." marks zlib), ".", then 27 base64url characters of HMAC-SHA1
_TOKEN_SHAPE = re.compile(r"\.?[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{27}")
_MAX_TOKEN_CHARS = 8192
_INVALID = "token payload is invalid"
_MAX_SUBJECT_CHARS = 256
_MAX_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z
_MAX_INTEGER = 2**63 - 1


class _TokenSerializer(URLSafeSerializer):
    """URLSafeSerializer that never zlib-compresses the tokens it signs.

    Stock URLSafeSerializer compresses when that is shorter, and zlib output differs between
    libraries; plain base64url JSON keeps issuing reproducible in any language. Verifying
    still accepts compressed tokens (a leading ".") from parents that use itsdangerous.
    """

    def dump_payload(self, obj: object) -> bytes:
        return base64_encode(json.dumps(obj, separators=(",", ":"), ensure_ascii=False))


@dataclass(frozen=True)
class BatchQuota:
    """What a token allows of batches (claims `batch`, `batch_files`, `batch_bytes`): uploads
    in that batch only, and the batch at most this many files or bytes; None: no limit."""

    name: str | None = None
    max_files: int | None = None
    max_bytes: int | None = None

    def check_batch(self, name: str) -> None:
        """404 for a batch other than the token's own (it may not learn of others)."""
        if self.name is not None and self.name != name:
            raise UploadNotFound("no such batch")


NO_BATCH_QUOTA = BatchQuota()


@dataclass(frozen=True)
class Grant:
    """What one verified token (or development mode) allows."""

    subject: str
    actions: frozenset[str]
    max_size_bytes: int | None = None
    upload_id: str | None = None
    metadata: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    expires_at: float | None = None
    finishes: bool = False  # the `fin` claim: may finish the uploads it creates after `exp`
    batch_quota: BatchQuota = NO_BATCH_QUOTA
    # SHA-256 (hex) of the token's text: what an upload records, never the token itself
    token_digest: str = field(default="", repr=False, compare=False)
    expired: bool = False  # past `exp`: accepted only to finish the upload it created

    @property
    def created_by(self) -> str:
        """What an upload created with this grant records as its creator: the token's digest
        when the token may finish what it starts (the `fin` claim), else ""."""
        return self.token_digest if self.finishes else ""

    @property
    def finishing(self) -> str | None:
        """None while the token is valid; once past its `exp` (a `fin` token, accepted on
        FINISHING_METHODS only), the creator digest the upload must have: the service
        refuses (401 token expired) any other upload, and its own once it is no longer
        uploading."""
        return self.token_digest if self.expired else None

    def require(self, *any_of: str) -> None:
        """Return if at least one of `any_of` is granted; raise Forbidden (403) naming them."""
        if not any_of:
            raise ValueError("name at least one action")
        if self.actions.isdisjoint(any_of):
            raise Forbidden(f"this token does not allow {' or '.join(any_of)}")

    def check_upload(self, upload_id: str) -> None:
        """Raise UploadNotFound (404) if the grant is bound to a different upload id."""
        if self.upload_id is not None and self.upload_id != upload_id:
            raise UploadNotFound()

    def check_metadata(self, metadata: Mapping[str, bytes | None]) -> None:
        """Raise Forbidden (403) unless every constrained key is present with an allowed value.

        Values are compared after UTF-8 decoding; the refused value is never echoed.
        """
        for key, allowed in self.metadata.items():
            raw = metadata.get(key)
            if raw is None:
                raise Forbidden(f"this token requires the Upload-Metadata key {key!r}")
            try:
                value = raw.decode("utf-8")
            except UnicodeDecodeError:
                value = None
            if value not in allowed:
                raise Forbidden(
                    f"this token does not allow that value for {key!r}; "
                    f"allowed: {', '.join(allowed)}"
                )


ANONYMOUS = Grant(subject="anonymous", actions=ACTIONS)


def issue_token(
    secret: str,
    *,
    subject: str,
    actions: Iterable[str],
    ttl_s: float,
    max_size_bytes: int | None = None,
    upload_id: str | None = None,
    metadata: Mapping[str, Sequence[str]] | None = None,
    finishes: bool = False,
    batch: str | None = None,
    batch_files: int | None = None,
    batch_bytes: int | None = None,
    now: float | None = None,
) -> str:
    """Return a token signed with `secret` that expires `ttl_s` seconds after `now`; with
    `finishes`, the `fin` claim: it keeps working after its expiry for HEAD, PATCH and DELETE
    of the uploads it created, until each completes or expires. With `batch`, it creates
    uploads in that batch only (and reaches no other batch), and `batch_files` and
    `batch_bytes` bound that batch's files and bytes.

    Raises ValueError for an empty secret, subject or upload id, no or unknown actions, a
    ttl that is not a positive finite number, a negative max size, or a metadata constraint
    given as one string instead of a list of allowed values.
    """
    wanted = set(actions)
    if not secret or not subject or upload_id == "":
        raise ValueError("the secret, the subject and an upload_id must not be empty")
    if not wanted or not wanted <= ACTIONS:
        raise ValueError(f"actions must be a non-empty subset of {sorted(ACTIONS)}")
    if not (math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError("ttl_s must be a positive number of seconds")
    if max_size_bytes is not None and max_size_bytes < 0:
        raise ValueError("max_size_bytes must not be negative")
    if any(limit is not None and limit < 1 for limit in (batch_files, batch_bytes)):
        raise ValueError("batch_files and batch_bytes must be at least 1")
    if batch == "":
        raise ValueError("a batch name must not be empty")
    if metadata and any(isinstance(values, str) for values in metadata.values()):
        raise ValueError("metadata constraints map each key to a list of allowed values")
    issued_at = time.time() if now is None else now
    payload: dict[str, object] = {
        "sub": subject,
        "act": [action for action in _ACTION_ORDER if action in wanted],
        "iat": math.floor(issued_at),
        "exp": math.ceil(issued_at + ttl_s),
    }
    optional = {
        "max": max_size_bytes,
        "uid": upload_id,
        "md": {key: list(values) for key, values in metadata.items()} if metadata else None,
        "batch": batch,
        "batch_files": batch_files,
        "batch_bytes": batch_bytes,
    }
    payload.update((key, value) for key, value in optional.items() if value is not None)
    if finishes:
        payload["fin"] = True
    return _TokenSerializer(secret, salt=TOKEN_SALT).dumps(payload)


def verify_token(
    token: str,
    secrets: Sequence[str],
    *,
    now: float | None = None,
    leeway_s: float = DEFAULT_LEEWAY_S,
    allow_finishing: bool = False,
) -> Grant:
    """Return the Grant of a token signed with any of `secrets`. With `allow_finishing`, a
    token with the `fin` claim that is past its `exp` comes back as an `expired` grant
    instead of a refusal (the caller lets it finish only the upload it created).

    Raises Unauthorized (401) with the reason "malformed token", "bad signature" (forged,
    tampered or signed with a secret not configured), "token payload is invalid: ...",
    "token expired" (exp more than `leeway_s` ago) or "token issued in the future" (iat
    more than `leeway_s` ahead). Raises ValueError if `secrets` is empty.
    """
    if not secrets:
        raise ValueError("verify_token needs at least one secret")
    if len(token) > _MAX_TOKEN_CHARS or not _TOKEN_SHAPE.fullmatch(token):
        raise Unauthorized("malformed token")
    try:
        payload: object = _TokenSerializer(list(secrets), salt=TOKEN_SALT).loads(token)
    except BadPayload as exc:  # signed by a secret we know, yet not base64url JSON
        raise Unauthorized(f"{_INVALID}: not base64url-encoded JSON") from exc
    except BadSignature as exc:
        raise Unauthorized("bad signature") from exc
    grant, expires, issued_at = _grant_from_payload(payload)
    current = time.time() if now is None else now
    expired = current > expires + leeway_s
    if expired and not (allow_finishing and grant.finishes):
        raise Unauthorized(EXPIRED)
    if issued_at is not None and issued_at > current + leeway_s:
        raise Unauthorized("token issued in the future: the parent's clock is ahead")
    digest = hashlib.sha256(token.encode("ascii")).hexdigest()
    return replace(grant, token_digest=digest, expired=expired)


def _grant_from_payload(payload: object) -> tuple[Grant, int, int | None]:
    """Return the grant, exp and iat of a payload; raise Unauthorized naming a bad field."""
    if not isinstance(payload, dict):
        raise Unauthorized(f"{_INVALID}: not a JSON object")
    subject, expires, acts = payload.get("sub"), payload.get("exp"), payload.get("act")
    issued_at, max_size, upload_id = payload.get("iat"), payload.get("max"), payload.get("uid")
    constraints = {} if payload.get("md") is None else payload["md"]
    finishes = payload.get("fin")
    batch = payload.get("batch")
    batch_limits = (payload.get("batch_files"), payload.get("batch_bytes"))
    if not _is_text(subject, _MAX_SUBJECT_CHARS) or not subject:
        raise Unauthorized(
            f"{_INVALID}: sub must be a non-empty string of at most {_MAX_SUBJECT_CHARS} characters"
        )
    if not _is_time(expires) or not (issued_at is None or _is_time(issued_at)):
        raise Unauthorized(f"{_INVALID}: exp and iat must be integers (unix seconds)")
    if not (_is_str_list(acts) and acts and ACTIONS.issuperset(acts)):
        raise Unauthorized(f"{_INVALID}: act must be a non-empty list of {sorted(ACTIONS)}")
    if max_size is not None and not (_is_int(max_size) and 0 <= max_size <= _MAX_INTEGER):
        raise Unauthorized(f"{_INVALID}: max must be a non-negative integer")
    if upload_id is not None and not (_is_text(upload_id, _MAX_SUBJECT_CHARS) and upload_id):
        raise Unauthorized(f"{_INVALID}: uid must be a non-empty string")
    if not isinstance(constraints, dict) or not all(
        _is_text(key) and _is_str_list(values) for key, values in constraints.items()
    ):
        raise Unauthorized(f"{_INVALID}: md must map keys to lists of strings")
    if finishes is not None and not isinstance(finishes, bool):
        raise Unauthorized(f"{_INVALID}: fin must be true or false")
    if batch is not None and not (_is_text(batch, _MAX_SUBJECT_CHARS) and batch):
        raise Unauthorized(f"{_INVALID}: batch must be a non-empty string")
    if not all(
        limit is None or (_is_int(limit) and 1 <= limit <= _MAX_INTEGER) for limit in batch_limits
    ):
        raise Unauthorized(f"{_INVALID}: batch_files and batch_bytes must be positive integers")
    grant = Grant(
        subject=subject,
        actions=frozenset(acts),
        max_size_bytes=max_size,
        upload_id=upload_id,
        metadata=MappingProxyType({k: tuple(v) for k, v in constraints.items()}),
        expires_at=float(expires),
        finishes=finishes is True,
        batch_quota=BatchQuota(batch, *batch_limits),
    )
    return grant, expires, issued_at


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_time(value: object) -> TypeGuard[int]:
    """Unix seconds a float holds exactly, up to the year 9999."""
    return _is_int(value) and 0 <= value <= _MAX_TIME


def _is_text(value: object, max_chars: int = _MAX_TOKEN_CHARS) -> TypeGuard[str]:
    """A string that is valid UTF-8 text (JSON allows lone surrogates; Redis, logs and
    headers do not) and not longer than `max_chars`."""
    if not isinstance(value, str) or len(value) > max_chars:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_str_list(value: object) -> TypeGuard[list[str]]:
    return isinstance(value, list) and all(_is_text(item) for item in value)


def token_from_request(
    method: str, headers: Mapping[str, str], query: Mapping[str, str]
) -> str | None:
    """Return the token of a request: `Authorization: Bearer`, else `?token=` on GET/HEAD.

    Returns None if there is neither. Raises Unauthorized (401) for an Authorization header
    that is not "Bearer <token>", and for a query token on any method but GET and HEAD.
    """
    query_token = query.get("token")
    if query_token is not None and method.upper() not in _QUERY_TOKEN_METHODS:
        raise Unauthorized(
            "the ?token= query parameter is only accepted on GET and HEAD; "
            "send Authorization: Bearer <token>"
        )
    # a scan, not .get(): aiohttp's headers ignore case, a plain dict does not
    authorization = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
    if authorization is not None:
        parts = authorization.split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            raise Unauthorized("malformed Authorization header")
        return parts[1]
    return query_token


def grant_for_request(
    method: str,
    headers: Mapping[str, str],
    query: Mapping[str, str],
    secrets: Sequence[str],
    *,
    now: float | None = None,
    leeway_s: float = DEFAULT_LEEWAY_S,
    may_finish: bool = False,
) -> Grant:
    """Return what the request may do: ANONYMOUS without secrets (development mode), else
    the grant of its verified token. `may_finish`: the request is about one upload, so an
    expired token with the `fin` claim may still HEAD, PATCH or DELETE it (an `expired`
    grant; whether the upload is the token's own is decided once it is known).

    Raises Unauthorized (401) if there is no token, or as token_from_request and
    verify_token do. Whether the grant covers the method is the caller's check
    (ACTIONS_FOR_METHOD with Grant.require).
    """
    if not secrets:
        return ANONYMOUS
    token = token_from_request(method, headers, query)
    if token is None:
        raise Unauthorized("a token is required: send Authorization: Bearer <token>")
    finishing = may_finish and method.upper() in FINISHING_METHODS
    return verify_token(token, secrets, now=now, leeway_s=leeway_s, allow_finishing=finishing)
