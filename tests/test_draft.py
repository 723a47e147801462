"""Unit and property tests of tusserver.draft: classification, the version table, Structured
Field booleans and integers, lengths, limits, digests and metadata."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from tusserver import draft
from tusserver.draft import NEWEST, VERSIONS, DigestMismatch, InconsistentLength
from tusserver.errors import BadRequest


def headers(**fields: str) -> CIMultiDict[str]:
    return CIMultiDict({name.replace("_", "-"): value for name, value in fields.items()})


def test_tus_resumable_decides_whatever_else_a_request_carries() -> None:
    sent = headers(Tus_Resumable="1.0.0", Upload_Complete="?1", Upload_Draft_Interop_Version="6")
    assert draft.classify(sent) is None
    assert draft.classify(headers(Upload_Offset="0")) is None  # no draft field: tus (412 later)


@pytest.mark.parametrize("number", sorted(VERSIONS))
def test_an_interop_version_picks_its_row(number: int) -> None:
    version = draft.classify(headers(Upload_Draft_Interop_Version=str(number)))
    assert version is VERSIONS[number] and version.interop == number


def test_completeness_fields_without_a_version() -> None:
    assert draft.classify(headers(Upload_Complete="?0")) is NEWEST
    assert draft.classify(headers(Upload_Incomplete="?1")) is VERSIONS[3]


@pytest.mark.parametrize("value", ["4", "7", "10", "x", "", "6.0"])
def test_an_unknown_interop_version_is_refused(value: str) -> None:
    with pytest.raises(BadRequest, match="3, 5, 6, 8, 9"):
        draft.classify(headers(Upload_Draft_Interop_Version=value))


def test_the_table_says_where_versions_differ() -> None:
    assert (VERSIONS[3].complete_field, VERSIONS[3].is_inverted) == ("Upload-Incomplete", True)
    assert [VERSIONS[n].requires_partial_upload for n in (3, 5, 6, 8, 9)] == [
        False, False, True, True, True,
    ]  # fmt: skip
    assert [VERSIONS[n].lifetime_key for n in (3, 5, 6, 8, 9)] == [
        None, None, "expires", "max-age", "max-age",
    ]  # fmt: skip
    assert [n for n, v in VERSIONS.items() if v.refuses_upload_fields] == [3, 5]


@given(st.booleans(), st.sampled_from([*VERSIONS.values(), NEWEST]))
def test_completeness_round_trips_in_every_version(
    is_complete: bool, version: draft.Version
) -> None:
    answer = draft.complete_headers(version, is_complete)
    assert draft.parse_complete(version, answer) is is_complete
    assert (draft.INTEROP_HEADER in answer) == (version.interop is not None)


@given(st.text(max_size=5))
def test_only_sf_booleans_are_booleans(value: str) -> None:
    parsed = draft.parse_sf_boolean(value)
    assert parsed is ({"?1": True, "?0": False}.get(value.strip(" \t")))


@given(st.integers(min_value=-(10**15) + 1, max_value=10**15 - 1))
def test_sf_integers_round_trip(number: int) -> None:
    assert draft.parse_sf_integer(f" {number}") == number


@pytest.mark.parametrize("value", ["1.5", "+3", "0x10", "1" * 16, "", "?1"])
def test_other_values_are_not_sf_integers(value: str) -> None:
    assert draft.parse_sf_integer(value) is None


def test_a_bad_completeness_value_is_refused() -> None:
    with pytest.raises(BadRequest):
        draft.require_complete(NEWEST, headers(Upload_Complete="true"))
    with pytest.raises(BadRequest, match="required"):
        draft.require_complete(VERSIONS[3], headers(Upload_Complete="?1"))


@given(st.integers(0, 2**40), st.integers(0, 2**40))
def test_length_from_the_completing_content(offset: int, content: int) -> None:
    assert draft.resolved_length(None, True, content, offset) == offset + content
    assert draft.resolved_length(offset + content, True, content, offset) == offset + content
    assert draft.resolved_length(None, False, content, offset) is None
    with pytest.raises(InconsistentLength):
        draft.resolved_length(offset + content + 1, True, content, offset)


def test_limits_per_version() -> None:
    assert draft.format_limits(VERSIONS[5], max_size=10, lifetime_s=5) is None
    assert draft.format_limits(VERSIONS[6], max_size=10, lifetime_s=5.9) == "max-size=10, expires=5"
    assert draft.format_limits(NEWEST, max_size=None, lifetime_s=None) == "min-size=0"
    assert draft.format_limits(NEWEST, max_size=None, lifetime_s=-3) == "max-age=0"


@given(st.integers(0, 10**12), st.integers(0, 10**9))
def test_limits_parse_back(max_size: int, lifetime: int) -> None:
    value = draft.format_limits(VERSIONS[8], max_size=max_size, lifetime_s=lifetime)
    assert value is not None
    assert draft.parse_limits(value) == {"max-size": max_size, "max-age": lifetime}


def sf_digest(name: str, digest: bytes) -> str:
    return f"{name}=:{base64.b64encode(digest).decode()}:"


@given(st.binary(max_size=64))
def test_the_strongest_known_digest_is_taken(data: bytes) -> None:
    members = [
        sf_digest("md5", b"x" * 16),
        sf_digest("sha-256", hashlib.sha256(data).digest()),
        sf_digest("sha-512", hashlib.sha512(data).digest()),
    ]
    value = ", ".join(members)
    checksum = draft.parse_digest(value, "Content-Digest")
    assert checksum is not None
    assert (checksum.algorithm, checksum.digest) == ("sha512", hashlib.sha512(data).digest())


def test_digests_of_other_algorithms_are_ignored_and_wrong_sizes_match_nothing() -> None:
    assert draft.parse_digest(sf_digest("crc32c", b"1234"), "Repr-Digest") is None
    with pytest.raises(DigestMismatch):
        draft.parse_digest(sf_digest("sha-256", b"short"), "Repr-Digest")
    with pytest.raises(BadRequest):
        draft.parse_digest("sha-256=abc", "Repr-Digest")


def test_repr_digest_counts_only_for_the_whole_representation() -> None:
    sent = headers(Repr_Digest=sf_digest("sha-256", hashlib.sha256(b"a").digest()))
    assert draft.request_digest(sent, is_whole_representation=False) is None
    assert draft.request_digest(sent, is_whole_representation=True) is not None


def test_old_versions_refuse_upload_fields_on_head_and_delete() -> None:
    with pytest.raises(BadRequest):
        draft.check_no_upload_fields(VERSIONS[3], headers(Upload_Incomplete="?1"))
    with pytest.raises(BadRequest):
        draft.check_no_upload_fields(VERSIONS[5], headers(Upload_Offset="0"))
    draft.check_no_upload_fields(VERSIONS[8], headers(Upload_Offset="0"))


def test_metadata_from_representation_fields() -> None:
    assert draft.metadata_of("image/jpeg; q=1", 'inline; filename="a \\"b\\".jpg"') == {
        "filetype": b"image/jpeg", "filename": b'a "b".jpg',
    }  # fmt: skip
    assert draft.metadata_of(None, "inline; filename*=UTF-8''f%C3%BC.txt") == {
        "filename": "fü.txt".encode(),
    }
    assert draft.metadata_of("application/partial-upload", None) == {}


def test_upload_metadata_of_a_draft_creation_is_kept_and_named_keys_win() -> None:
    """tus-js-client's draft modes send tus's Upload-Metadata on the creation."""
    headers = {
        "Upload-Metadata": f"filename {base64.b64encode(b'a.txt').decode()},is_live",
        "Content-Type": "text/plain",
        "Content-Disposition": 'attachment; filename="other.txt"',
    }
    assert draft.creation_metadata(headers) == {
        "filetype": b"text/plain", "filename": b"a.txt", "is_live": None,
    }  # fmt: skip
    assert draft.creation_metadata({"Content-Type": "image/png"}) == {"filetype": b"image/png"}
    with pytest.raises(BadRequest):
        draft.creation_metadata({"Upload-Metadata": "filename not-base64!"})
