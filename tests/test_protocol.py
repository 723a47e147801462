"""Unit and property tests of tusserver.protocol: every parser, formatter and refusal."""

from __future__ import annotations

import base64
import hashlib
import re
import string
from email.utils import parsedate_to_datetime
from urllib.parse import unquote

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from tusserver import protocol
from tusserver.errors import (
    BadRequest,
    ChecksumMismatch,
    PreconditionFailed,
    TusError,
    UnsupportedMediaType,
)
from tusserver.protocol import Checksum, Concat

KEY_ALPHABET = "".join(c for c in map(chr, range(0x21, 0x7F)) if c != ",")
metadata_keys = st.text(alphabet=KEY_ALPHABET, min_size=1, max_size=20)
metadata_values = st.none() | st.binary(max_size=200)
path_segments = st.text(alphabet=string.ascii_letters + string.digits + "-._~%", min_size=1)
url_paths = st.lists(path_segments, min_size=1, max_size=4).map(lambda s: "/" + "/".join(s))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --- Tus-Resumable -----------------------------------------------------------------------


def test_tus_resumable_accepts_the_supported_version() -> None:
    protocol.check_tus_resumable("1.0.0")
    protocol.check_tus_resumable(" 1.0.0 ")


@pytest.mark.parametrize("value", [None, "", "0.2.2", "1.0", "1.0.0,0.2.2", "1.0.0.0", "v1.0.0"])
def test_tus_resumable_missing_or_unsupported_is_412_with_tus_version(value: str | None) -> None:
    with pytest.raises(PreconditionFailed) as caught:
        protocol.check_tus_resumable(value)
    assert caught.value.status == 412
    assert caught.value.headers == {"Tus-Version": "1.0.0"}
    assert "Tus-Resumable" in caught.value.reason


def test_constants_match_the_protocol() -> None:
    assert protocol.TUS_VERSION == "1.0.0"
    assert protocol.TUS_VERSION in protocol.SUPPORTED_VERSIONS
    assert protocol.OFFSET_CONTENT_TYPE == "application/offset+octet-stream"
    assert protocol.CHECKSUM_ALGORITHMS == ("md5", "sha1", "sha256", "sha512")


# --- Upload-Length, Upload-Defer-Length, Upload-Offset -----------------------------------


def test_upload_length_absent_is_none() -> None:
    assert protocol.parse_upload_length(None) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("0", 0), ("12345", 12345), ("007", 7), (" 42\t", 42), (str(2**63 - 1), 2**63 - 1)],
)
def test_upload_length_parses_decimal_digits(value: str, expected: int) -> None:
    assert protocol.parse_upload_length(value) == expected


BAD_INTEGERS = [
    "", " ", "-1", "+1", "1 000", "1.0", "1e3", "0x10", "abc", "12a", "\u0661\u0662",
    "\uff11", "²", str(2**63), "9" * 30, "1\n",
]  # fmt: skip


@pytest.mark.parametrize("value", BAD_INTEGERS)
def test_upload_length_not_a_decimal_integer_is_400(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_upload_length(value)
    assert caught.value.status == 400
    assert "Upload-Length" in caught.value.reason


@pytest.mark.parametrize("value", BAD_INTEGERS)
def test_upload_offset_not_a_decimal_integer_is_400(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_upload_offset(value)
    assert caught.value.status == 400
    assert "Upload-Offset" in caught.value.reason


def test_upload_offset_missing_is_400() -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_upload_offset(None)
    assert caught.value.status == 400
    assert caught.value.reason == "Upload-Offset header is required"


def test_upload_offset_parses_decimal_digits() -> None:
    assert protocol.parse_upload_offset("0") == 0
    assert protocol.parse_upload_offset("1048576") == 1048576


@given(st.integers(min_value=0, max_value=2**63 - 1))
def test_length_and_offset_accept_every_non_negative_integer(n: int) -> None:
    assert protocol.parse_upload_length(str(n)) == n
    assert protocol.parse_upload_offset(str(n)) == n


@given(st.integers(min_value=2**63))
def test_length_and_offset_refuse_integers_past_the_maximum(n: int) -> None:
    with pytest.raises(BadRequest):
        protocol.parse_upload_length(str(n))
    with pytest.raises(BadRequest):
        protocol.parse_upload_offset(str(n))


@given(st.text())
def test_length_and_offset_refuse_anything_but_digits(value: str) -> None:
    assume(not re.fullmatch(r"[ \t]*[0-9]+[ \t]*", value))
    with pytest.raises(BadRequest):
        protocol.parse_upload_length(value)
    with pytest.raises(BadRequest):
        protocol.parse_upload_offset(value)


def test_defer_length() -> None:
    assert protocol.parse_defer_length(None) is False
    assert protocol.parse_defer_length("1") is True


@pytest.mark.parametrize("value", ["", "0", "true", "2", "01", "1,1"])
def test_defer_length_other_than_1_is_400(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_defer_length(value)
    assert caught.value.status == 400
    assert "Upload-Defer-Length" in caught.value.reason


# --- Upload-Metadata ---------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "  "])
def test_metadata_absent_or_empty_is_empty(value: str | None) -> None:
    assert protocol.parse_metadata(value) == {}


def test_metadata_parses_pairs_and_bare_keys() -> None:
    value = f"filename {b64('wörld.txt'.encode())},is_confidential, filetype {b64(b'text/plain')}"
    assert protocol.parse_metadata(value) == {
        "filename": "wörld.txt".encode(),
        "is_confidential": None,
        "filetype": b"text/plain",
    }


def test_metadata_tolerates_whitespace_around_pairs() -> None:
    value = "  a YQ== ,\tb\t, c  Yw  "
    assert protocol.parse_metadata(value) == {"a": b"a", "b": None, "c": b"c"}


def test_metadata_key_followed_by_space_is_an_empty_value() -> None:
    assert protocol.parse_metadata("a ,b") == {"a": b"", "b": None}


@pytest.mark.parametrize(
    ("encoded", "decoded"), [("YQ", b"a"), ("YWI", b"ab"), ("YWJj", b"abc"), ("YWI=", b"ab")]
)
def test_metadata_accepts_padded_and_unpadded_base64(encoded: str, decoded: bytes) -> None:
    assert protocol.parse_metadata(f"k {encoded}") == {"k": decoded}


@pytest.mark.parametrize(
    "value",
    [
        "a b,,c",  # empty pair
        "a YQ==,",  # trailing empty pair
        ",a YQ==",  # leading empty pair
        " , ",
        "a YQ==,a YQ==",  # duplicate key
        "a,a",
        "a Y",  # one character is never base64
        "a YQ=",  # partial padding
        "a YQ===",
        "a Y=Q=",
        "a YQ-_",  # url-safe alphabet
        "a YQ==!",
        "a YQ== YQ==",  # two values
        "k\u00e9y YQ==",  # non-ASCII key
        "a\tb YQ==",  # tab in the key
        "a\x01 YQ==",  # control character in the key
    ],
)
def test_metadata_malformed_is_400(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_metadata(value)
    assert caught.value.status == 400
    assert "Upload-Metadata" in caught.value.reason


def test_metadata_over_the_limit_is_400_and_at_the_limit_is_accepted() -> None:
    prefix = "k "
    body_len = (protocol.MAX_METADATA_BYTES - len(prefix)) // 4 * 4
    at_limit = prefix + "A" * body_len
    assert len(at_limit) <= protocol.MAX_METADATA_BYTES
    assert protocol.parse_metadata(at_limit) == {"k": bytes(body_len // 4 * 3)}
    with pytest.raises(BadRequest) as caught:
        protocol.parse_metadata("k " + "A" * protocol.MAX_METADATA_BYTES)
    assert caught.value.status == 400
    assert "longer than" in caught.value.reason


def test_metadata_limit_counts_utf8_bytes() -> None:
    # Under the limit in characters but over it in bytes: refused, never decoded.
    value = "k " + "\u00e9" * (protocol.MAX_METADATA_BYTES // 2)
    assert len(value) <= protocol.MAX_METADATA_BYTES
    with pytest.raises(BadRequest) as caught:
        protocol.parse_metadata(value)
    assert "longer than" in caught.value.reason


def test_format_metadata() -> None:
    assert protocol.format_metadata({}) == ""
    assert protocol.format_metadata({"a": b"a", "flag": None, "e": b""}) == "a YQ==,flag,e "


@pytest.mark.parametrize("key", ["", "a b", "a,b", "k\u00e9", "a\n"])
def test_format_metadata_refuses_invalid_keys(key: str) -> None:
    with pytest.raises(ValueError, match="key"):
        protocol.format_metadata({key: b"x"})


@given(st.dictionaries(metadata_keys, metadata_values, max_size=10))
def test_metadata_round_trips(metadata: dict[str, bytes | None]) -> None:
    assert protocol.parse_metadata(protocol.format_metadata(metadata)) == metadata


@given(metadata_keys, st.binary(max_size=200))
def test_metadata_unpadded_values_decode_like_padded_ones(key: str, data: bytes) -> None:
    assert protocol.parse_metadata(f"{key} {b64(data).rstrip('=')}") == {key: data}


@given(st.text(max_size=300))
def test_metadata_refuses_only_with_bad_request(value: str) -> None:
    try:
        parsed = protocol.parse_metadata(value)
    except BadRequest:
        return
    assert all(re.fullmatch(r"[\x21-\x2b\x2d-\x7e]+", key) for key in parsed)


# --- Upload-Concat -----------------------------------------------------------------------


def test_concat_absent_is_none() -> None:
    assert protocol.parse_concat(None) is None


def test_concat_partial() -> None:
    assert protocol.parse_concat("partial") == Concat(is_final=False, partial_paths=())
    assert protocol.parse_concat(" partial ") == Concat(is_final=False, partial_paths=())


def test_concat_final_keeps_only_the_paths() -> None:
    value = "final;/files/a https://tus.example:8443/files/b?x=1#frag  http://host/files/c%20d"
    assert protocol.parse_concat(value) == Concat(
        is_final=True, partial_paths=("/files/a", "/files/b", "/files/c%20d")
    )


def test_concat_final_with_space_after_semicolon() -> None:
    assert protocol.parse_concat("final; /files/a") == Concat(True, ("/files/a",))


@pytest.mark.parametrize(
    "value",
    [
        "",
        "partial;",
        "Partial",
        "final",
        "final;",
        "final;   ",
        "FINAL;/files/a",
        "final /files/a",
        "other;/files/a",
        "final;files/a",  # relative path
        "final;//host/files/a",  # scheme-relative
        "final;ftp://host/files/a",
        "final;https:///files/a",  # no host
        "final;https://host",  # no path
        "final;http://[::1/files/a",  # malformed host
        "final;/files/a\t/files/b",
        "final;/files/\u00e9",
        "final;/files/a\n",
    ],
)
def test_concat_malformed_is_400(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_concat(value)
    assert caught.value.status == 400
    assert "Upload-Concat" in caught.value.reason


def test_concat_over_the_limit_is_400() -> None:
    value = "final;" + " ".join(["/files/abcdefgh"] * (protocol.MAX_CONCAT_BYTES // 16 + 1))
    assert len(value) > protocol.MAX_CONCAT_BYTES
    with pytest.raises(BadRequest) as caught:
        protocol.parse_concat(value)
    assert "longer than" in caught.value.reason


def test_format_concat() -> None:
    assert protocol.format_concat(Concat(False, ()), []) == "partial"
    final = Concat(True, ("/files/a", "/files/b"))
    urls = ["http://h/files/a", "http://h/files/b"]
    assert protocol.format_concat(final, urls) == "final;http://h/files/a http://h/files/b"


@pytest.mark.parametrize("urls", [[], ["http://h/a b"], ["http://h/a\r\nX: y"]])
def test_format_concat_refuses_a_final_without_clean_urls(urls: list[str]) -> None:
    with pytest.raises(ValueError, match="final"):
        protocol.format_concat(Concat(True, ("/a",)), urls)


@given(
    st.lists(
        st.tuples(
            url_paths,
            st.sampled_from(["", "http://localhost", "https://tus.example:1080"]),
            st.sampled_from(["", "?a=1", "#f", "?a=b#c"]),
        ),
        min_size=1,
        max_size=5,
    )
)
def test_concat_keeps_the_paths_of_any_urls(parts: list[tuple[str, str, str]]) -> None:
    urls = [origin + path + suffix for path, origin, suffix in parts]
    header = protocol.format_concat(Concat(True, ()), urls)
    assert protocol.parse_concat(header) == Concat(True, tuple(path for path, _, _ in parts))


@given(st.text(max_size=200))
def test_concat_refuses_only_with_bad_request(value: str) -> None:
    try:
        concat = protocol.parse_concat(value)
    except BadRequest:
        return
    assert concat is not None
    assert all(path.startswith("/") for path in concat.partial_paths)


# --- Upload-Checksum ---------------------------------------------------------------------


def test_checksum_absent_is_none() -> None:
    assert protocol.parse_checksum(None) is None


@pytest.mark.parametrize("algorithm", ["md5", "sha1", "sha256", "sha512"])
def test_checksum_parses_every_supported_algorithm(algorithm: str) -> None:
    digest = hashlib.new(algorithm, b"hello").digest()
    parsed = protocol.parse_checksum(f"{algorithm.upper()} {b64(digest)}")
    assert parsed == Checksum(algorithm=algorithm, digest=digest)


def test_checksum_accepts_unpadded_digest() -> None:
    digest = hashlib.md5(b"x").digest()  # noqa: S324 - the tus checksum algorithm, not security
    assert protocol.parse_checksum(f"md5 {b64(digest).rstrip('=')}") == Checksum("md5", digest)


def test_checksum_unsupported_algorithm_is_400() -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_checksum(f"crc32 {b64(b'1234')}")
    assert caught.value.status == 400
    assert caught.value.reason.startswith("unsupported checksum algorithm 'crc32'")


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha1",
        "sha1 ",
        "sha1 not*base64",
        "sha1 " + b64(bytes(20)) + " extra",
    ],
)
def test_checksum_malformed_is_400(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_checksum(value)
    assert caught.value.status == 400


@pytest.mark.parametrize(
    "value",
    [
        "sha1 " + b64(bytes(19)),  # too short
        "sha1 " + b64(bytes(21)),  # too long
        "sha256 " + b64(bytes(20)),  # a sha1-sized digest
        "sha1 " + bytes(20).hex(),  # hex read as base64: 30 bytes
    ],
)
def test_checksum_of_the_wrong_length_is_a_mismatch_460(value: str) -> None:
    """No body can match a digest of another length than its algorithm's (the tus
    conformance suite expects 460, as for any other mismatch)."""
    with pytest.raises(ChecksumMismatch) as caught:
        protocol.parse_checksum(value)
    assert caught.value.status == 460


# --- Content-Type, method override -------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "application/offset+octet-stream",
        "Application/Offset+Octet-Stream",
        "application/offset+octet-stream; charset=binary",
        " application/offset+octet-stream ;x=y",
    ],
)
def test_offset_stream_accepted(value: str) -> None:
    assert protocol.has_offset_stream(value) is True
    protocol.require_offset_stream(value)


@pytest.mark.parametrize(
    "value",
    [None, "", "application/octet-stream", "text/plain", "application/offset+octet-streamx"],
)
def test_other_content_types_are_415(value: str | None) -> None:
    assert protocol.has_offset_stream(value) is False
    with pytest.raises(UnsupportedMediaType) as caught:
        protocol.require_offset_stream(value)
    assert caught.value.status == 415
    assert "application/offset+octet-stream" in caught.value.reason


def test_method_override() -> None:
    assert protocol.parse_method_override(None) is None
    assert protocol.parse_method_override("patch") == "PATCH"
    assert protocol.parse_method_override(" Delete ") == "DELETE"
    for method in ("PATCH", "DELETE", "HEAD", "GET", "POST", "OPTIONS"):
        assert protocol.parse_method_override(method) == method


@pytest.mark.parametrize("value", ["", "PUT", "TRACE", "CONNECT", "PATCH,DELETE", "PATCH\r\n"])
def test_method_override_unknown_is_400(value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        protocol.parse_method_override(value)
    assert caught.value.status == 400
    assert "X-HTTP-Method-Override" in caught.value.reason


# --- Response headers --------------------------------------------------------------------


def test_format_http_date() -> None:
    assert protocol.format_http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    assert protocol.format_http_date(0.9) == "Thu, 01 Jan 1970 00:00:00 GMT"


@given(st.floats(min_value=0, max_value=253402300799))
def test_format_http_date_is_imf_fixdate(epoch_s: float) -> None:
    value = protocol.format_http_date(epoch_s)
    assert re.fullmatch(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT", value)
    assert parsedate_to_datetime(value).timestamp() == int(epoch_s)


def test_format_repr_digest() -> None:
    digest = hashlib.sha256(b"").digest()
    assert (
        protocol.format_repr_digest(digest)
        == "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    )
    with pytest.raises(ValueError, match="32 bytes"):
        protocol.format_repr_digest(b"short")


def test_content_disposition_without_a_name() -> None:
    assert protocol.content_disposition(None) == "attachment"
    assert protocol.content_disposition("") == "attachment"


def test_content_disposition_plain_name() -> None:
    assert (
        protocol.content_disposition("report 2024.pdf")
        == "attachment; filename=\"report 2024.pdf\"; filename*=UTF-8''report%202024.pdf"
    )


def test_content_disposition_unicode_name_has_ascii_fallback() -> None:
    assert (
        protocol.content_disposition("naïve €.txt")
        == "attachment; filename=\"na_ve _.txt\"; filename*=UTF-8''na%C3%AFve%20%E2%82%AC.txt"
    )


@pytest.mark.parametrize(
    ("name", "fallback"),
    [
        ('a"b.txt', "a_b.txt"),
        ("a\\b.txt", "a_b.txt"),
        ("../../etc/passwd", ".._.._etc_passwd"),
        ("x\r\nSet-Cookie: a=b", "x__Set-Cookie: a=b"),
        ("evil\u202etxt.exe", "evil_txt.exe"),
        ("100%.txt", "100_.txt"),
    ],
)
def test_content_disposition_replaces_dangerous_characters(name: str, fallback: str) -> None:
    value = protocol.content_disposition(name)
    assert f'filename="{fallback}";' in value
    encoded = value.split("filename*=UTF-8''", 1)[1]
    assert "/" not in unquote(encoded)
    assert "\\" not in unquote(encoded)
    assert "\r" not in unquote(encoded)
    assert "\u202e" not in unquote(encoded)


def test_content_disposition_caps_the_name() -> None:
    value = protocol.content_disposition("a" * 1000)
    assert 'filename="' + "a" * 255 + '"' in value
    assert "a" * 256 not in value


@given(st.text())
def test_content_disposition_is_always_safe_ascii(name: str) -> None:
    value = protocol.content_disposition(name)
    assert value.startswith("attachment")
    assert value.isascii()
    assert all(" " <= char <= "~" for char in value)
    if value != "attachment":
        match = re.fullmatch(r"attachment; filename=\"([^\"\\]*)\"; filename\*=UTF-8''(\S+)", value)
        assert match is not None
        assert re.fullmatch(r"[A-Za-z0-9!#$&+\-.^_`|~%]+", match.group(2))


@given(
    st.text(
        alphabet=st.characters(exclude_categories=["C"], exclude_characters="/\\"),
        min_size=1,
        max_size=255,
    )
)
def test_content_disposition_keeps_harmless_names_exactly(name: str) -> None:
    value = protocol.content_disposition(name)
    assert unquote(value.split("filename*=UTF-8''", 1)[1], errors="strict") == name


@pytest.mark.parametrize(
    ("filetype", "expected"),
    [
        (None, "application/octet-stream"),
        ("", "application/octet-stream"),
        ("image/png", "image/png"),
        ("IMAGE/JPEG", "image/jpeg"),
        ("video/mp4; codecs=avc1", "video/mp4"),
        ("application/pdf", "application/pdf"),
        ("text/plain", "text/plain; charset=utf-8"),
        ("text/plain; charset=latin-1", "text/plain; charset=utf-8"),
        ("text/csv", "text/csv; charset=utf-8"),
        ("text/html", "application/octet-stream"),
        ("text/html; charset=utf-8", "application/octet-stream"),
        ("image/svg+xml", "application/octet-stream"),
        ("application/javascript", "application/octet-stream"),
        ("text/javascript", "application/octet-stream"),
        ("application/xml", "application/octet-stream"),
        ("text/xml", "application/octet-stream"),
        ("application/xhtml+xml", "application/octet-stream"),
        ("image/png\r\nX-Evil: 1", "application/octet-stream"),
    ],
)
def test_download_content_type(filetype: str | None, expected: str) -> None:
    assert protocol.download_content_type(filetype) == expected


def test_safe_content_types_exclude_active_content() -> None:
    assert "text/plain" in protocol.SAFE_CONTENT_TYPES
    assert "image/webp" in protocol.SAFE_CONTENT_TYPES
    for media_type in ("text/html", "image/svg+xml", "application/javascript", "text/xml"):
        assert media_type not in protocol.SAFE_CONTENT_TYPES


@given(st.text(max_size=100))
def test_every_parser_refuses_only_with_tus_errors(value: str) -> None:
    for parse in (
        protocol.parse_upload_length,
        protocol.parse_defer_length,
        protocol.parse_checksum,
        protocol.parse_method_override,
        protocol.check_tus_resumable,
        protocol.require_offset_stream,
    ):
        try:
            parse(value)
        except TusError:
            pass


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("uploads.example.com", ("uploads.example.com", "")),
        ("127.0.0.1:1080", ("127.0.0.1", "1080")),
        ("[::1]:65535", ("[::1]", "65535")),
        ("example.com:0", ("", "")),
        ("example.com:00080", ("", "")),
        ("example.com:65536", ("", "")),
        ("example.com:", ("", "")),
        ("exa mple.com", ("", "")),
        ("exämple.com", ("", "")),
    ],
)
def test_split_host_takes_plain_names_and_ports_only(host: str, expected: tuple[str, str]) -> None:
    """A URL stored and sent to the parent is made from the Host: one spelling per place."""
    assert protocol.split_host(host) == expected
