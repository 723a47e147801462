"""Batches' names and their members' paths, parsed from an upload's metadata: pure
functions, no I/O (docs/events.md, "Batches"). Every refusal is a 400 with its reason."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tusserver.errors import BadRequest

BATCH_KEY = "batch"  # the Upload-Metadata key naming an upload's batch
# The metadata keys that give a member's path inside its batch, first found wins: Uppy's
# `relativePath` (set for files of a dropped folder), `path`, then the file's own name.
PATH_KEYS = ("relativePath", "path", "filename", "name")
MAX_BATCH_NAME = 128
MAX_PATH_BYTES = 1024
MAX_PATH_DEPTH = 32
_BATCH_NAME = re.compile(r"[A-Za-z0-9._~-]{1," + str(MAX_BATCH_NAME) + r"}\Z")
_PATH_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class Membership:
    """An upload's place in a batch: the batch's name and the upload's relative path."""

    batch: str
    path: str


def parse_batch_name(value: str) -> str:
    """A batch name: 1-128 URL-safe characters (letters, digits, `.`, `_`, `~`, `-`), not
    `.` or `..`; 400 otherwise."""
    if not _BATCH_NAME.match(value) or value in (".", ".."):
        raise BadRequest(
            f"a batch name is 1-{MAX_BATCH_NAME} letters, digits, '.', '_', '~' or '-'"
        )
    return value


def parse_relative_path(value: str) -> str:
    """A member's path inside its batch: relative, `/`-separated, no `.` or `..` or empty
    part, no control character or backslash, at most MAX_PATH_BYTES bytes and
    MAX_PATH_DEPTH parts; 400 otherwise. The path is only ever a label (files are stored by
    upload id), but the parent may well recreate the folder from it."""
    if not value or len(value.encode("utf-8", errors="replace")) > MAX_PATH_BYTES:
        raise BadRequest(f"a batch member's path must be 1-{MAX_PATH_BYTES} bytes")
    if _PATH_FORBIDDEN.search(value):
        raise BadRequest("a batch member's path has a control character or a backslash")
    if value.startswith("/") or re.match(r"[A-Za-z]:", value):
        raise BadRequest("a batch member's path must be relative")
    parts = value.split("/")
    if len(parts) > MAX_PATH_DEPTH:
        raise BadRequest(f"a batch member's path may have at most {MAX_PATH_DEPTH} parts")
    if any(part in ("", ".", "..") for part in parts):
        raise BadRequest("a batch member's path may not have empty, '.' or '..' parts")
    return value


def batch_membership(metadata: Mapping[str, bytes | None]) -> Membership | None:
    """The batch an upload's metadata names (`batch`) with its path (PATH_KEYS), or None;
    400 for an invalid name or path, or a member without any path."""
    raw_name = metadata.get(BATCH_KEY)
    if BATCH_KEY not in metadata:
        return None
    name = parse_batch_name(_metadata_str(raw_name, BATCH_KEY))
    for key in PATH_KEYS:
        raw = metadata.get(key)
        if raw:
            return Membership(name, parse_relative_path(_metadata_str(raw, key)))
    raise BadRequest("a batch member needs a relativePath, path or filename in Upload-Metadata")


def _metadata_str(raw: bytes | None, key: str) -> str:
    try:
        return (raw or b"").decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest(f"Upload-Metadata {key!r} is not UTF-8 text") from None
