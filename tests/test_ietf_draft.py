"""The IETF resumable-upload draft on the tus endpoint, on raw sockets (a 104 is invisible to
most HTTP clients), per interop version: creation with and without content, 104s, offset
retrieval, appends, completion without a prior length, problem types, limits, interrupted
creations and appends, cancellation, digests and tokens. A draft upload is an ordinary
upload: the bytes on disk and the SHA-256 are checked as for tus uploads."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping

import pytest

from tests.support.raw_http import RawRequest, RawResponse
from tests.support.servers import Server, ServerFactory
from tests.support.tus import TUS, bearer, repr_digest_of
from tests.support.waiting import wait_until
from tusserver.auth import issue_token
from tusserver.draft import VERSIONS, parse_limits

ALL_VERSIONS = [*VERSIONS, None]  # None: no interop version (the newest text)
PARTIAL = {"Content-Type": "application/partial-upload"}


def complete_field(version: int | None, is_complete: bool) -> dict[str, str]:
    """The completeness field as the version spells it (v3: `Upload-Incomplete`, inverted)."""
    if version == 3:
        return {"Upload-Incomplete": "?0" if is_complete else "?1"}
    return {"Upload-Complete": "?1" if is_complete else "?0"}


def versioned(version: int | None, is_complete: bool, **extra: str) -> dict[str, str]:
    headers = complete_field(version, is_complete)
    if version is not None:
        headers["Upload-Draft-Interop-Version"] = str(version)
    return headers | {name.replace("_", "-"): value for name, value in extra.items()}


def says_complete(version: int | None, response: RawResponse) -> bool:
    """What the answer's completeness field says (it must be there, as ?0 or ?1)."""
    ((name, complete),) = complete_field(version, True).items()
    ((_, incomplete),) = complete_field(version, False).items()
    assert response.headers.get(name.lower()) in (complete, incomplete), response.headers
    return response.headers[name.lower()] == complete


async def exchange(
    url: str, method: str, headers: Mapping[str, str], body: bytes = b""
) -> list[RawResponse]:
    """Send one request; every answer to it, the interim ones first."""
    sent = dict(headers)
    if body or method in ("POST", "PATCH"):
        sent.setdefault("Content-Length", str(len(body)))
    request = await RawRequest.start(url, method, sent)
    try:
        await request.send(body)
        return await answers(request, method)
    finally:
        await request.close()


async def answers(request: RawRequest, method: str = "POST") -> list[RawResponse]:
    found = [await request.response(has_body=method != "HEAD")]
    while found[-1].status < 200:
        found.append(await request.response(has_body=method != "HEAD"))
    return found


async def head(url: str, version: int | None, **headers: str) -> RawResponse:
    sent = dict(headers)
    if version is not None:
        sent["Upload-Draft-Interop-Version"] = str(version)
    else:
        sent["Upload-Complete"] = "?0"  # how the newest draft is told apart without a version
    (answer,) = await exchange(url, "HEAD", sent)
    return answer


def limits_of(response: RawResponse) -> dict[str, int]:
    return parse_limits(response.headers["upload-limit"])


# -- creation -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_a_whole_upload_in_one_creation(server: Server, version: int | None) -> None:
    data = bytes(range(256)) * 40
    *interim, final = await exchange(server.url, "POST", versioned(version, True), data)
    assert final.status == 201, final.body
    location = final.headers["location"]
    if version is None:
        assert interim == []  # no 104 to a client that named no interop version
    else:
        (resumption,) = interim
        assert resumption.status == 104
        assert resumption.headers["location"] == location
        assert resumption.headers["upload-draft-interop-version"] == str(version)
        assert ("upload-limit" in resumption.headers) == (version not in (3, 5))
    assert says_complete(version, final)
    assert final.headers["upload-offset"] == str(len(data))
    assert final.headers["repr-digest"] == repr_digest_of(data)
    assert "tus-resumable" not in final.headers
    assert server.file_of(location).read_bytes() == data
    state = await head(location, version)
    assert state.status == 204
    assert says_complete(version, state)
    assert state.headers["upload-length"] == str(len(data))
    assert state.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_parts_then_an_empty_completing_append_fixes_the_length(
    server: Server, version: int | None
) -> None:
    first, second = b"a" * 3000, b"b" * 2000
    *_, created = await exchange(server.url, "POST", versioned(version, False), first)
    assert created.status == 201 and not says_complete(version, created)
    location = created.headers["location"]
    assert created.headers["upload-offset"] == "3000"
    state = await head(location, version)
    assert "upload-length" not in state.headers and not says_complete(version, state)
    if version not in (3, 5):
        assert ("expires" if version == 6 else "max-age") in limits_of(state)
    content_type = PARTIAL if version not in (3, 5) else {}
    headers = versioned(version, False, Upload_Offset="3000") | content_type
    (appended,) = await exchange(location, "PATCH", headers, second)
    assert appended.status == 204 and appended.headers["upload-offset"] == "5000"
    assert not says_complete(version, appended)
    headers = versioned(version, True, Upload_Offset="5000") | content_type
    (completed,) = await exchange(location, "PATCH", headers)
    assert completed.status == 204 and says_complete(version, completed)
    state = await head(location, version)
    assert says_complete(version, state) and state.headers["upload-length"] == "5000"
    assert server.file_of(location).read_bytes() == first + second


async def test_a_creation_without_content_then_one_completing_append(server: Server) -> None:
    (created,) = await exchange(server.url, "POST", versioned(8, False, Upload_Length="4"))
    assert created.status == 201 and created.headers["upload-offset"] == "0"
    location = created.headers["location"]
    assert (await head(location, 8)).headers["upload-length"] == "4"
    (done,) = await exchange(
        location, "PATCH", versioned(8, True, Upload_Offset="0") | PARTIAL, b"abcd"
    )
    assert done.status == 204 and done.headers["repr-digest"] == repr_digest_of(b"abcd")


async def test_a_chunked_completing_creation_takes_its_end_as_the_length(server: Server) -> None:
    headers = versioned(9, True, Transfer_Encoding="chunked")
    request = await RawRequest.start(server.url, "POST", headers)
    try:
        resumption = await request.response()
        assert resumption.status == 104
        await request.send(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        final = await request.response()
    finally:
        await request.close()
    assert final.status == 201 and final.headers["upload-complete"] == "?1"
    state = await head(final.headers["location"], 9)
    assert state.headers["upload-length"] == "11"
    assert server.file_of(final.headers["location"]).read_bytes() == b"hello world"


async def test_a_tus_request_with_draft_fields_stays_tus(server: Server) -> None:
    """iOS adds draft fields to tus requests: `Tus-Resumable` decides, and no 104 comes."""
    headers = {**TUS, "Upload-Length": "3", "Upload-Complete": "?1",
               "Upload-Draft-Interop-Version": "6",
               "Content-Type": "application/offset+octet-stream"}  # fmt: skip
    (created,) = await exchange(server.url, "POST", headers, b"abc")
    assert created.status == 201 and created.headers["tus-resumable"] == "1.0.0"
    assert "upload-complete" not in created.headers


async def test_an_unknown_interop_version_is_refused(server: Server) -> None:
    headers = {"Upload-Draft-Interop-Version": "4", "Upload-Complete": "?1"}
    (answer,) = await exchange(server.url, "POST", headers, b"x")
    assert answer.status == 400 and b"3, 5, 6, 8, 9" in answer.body


# -- problems -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_a_mismatching_offset_is_a_409_problem(server: Server, version: int | None) -> None:
    *_, created = await exchange(server.url, "POST", versioned(version, False), b"12345")
    location = created.headers["location"]
    headers = versioned(version, False, Upload_Offset="7") | PARTIAL
    (answer,) = await exchange(location, "PATCH", headers, b"678")
    assert answer.status == 409
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.headers["upload-offset"] == "5" and not says_complete(version, answer)
    problem = json.loads(answer.body)
    assert problem["type"].endswith("#mismatching-upload-offset")
    assert (problem["expected-offset"], problem["provided-offset"]) == (5, 7)
    assert server.file_of(location).read_bytes() == b"12345"


async def test_inconsistent_lengths_are_a_400_problem(server: Server) -> None:
    headers = versioned(8, True, Upload_Length="10")
    (answer,) = await exchange(server.url, "POST", headers, b"12345")
    assert answer.status == 400
    assert json.loads(answer.body)["type"].endswith("#inconsistent-upload-length")
    (created,) = await exchange(server.url, "POST", versioned(8, False, Upload_Length="10"))
    headers = versioned(8, True, Upload_Offset="0") | PARTIAL
    (answer,) = await exchange(created.headers["location"], "PATCH", headers, b"12345")
    assert answer.status == 400 and answer.headers["upload-complete"] == "?0"
    assert json.loads(answer.body)["type"].endswith("#inconsistent-upload-length")
    assert (await head(created.headers["location"], 8)).headers["upload-offset"] == "0"


async def test_a_completed_upload_replays_its_answer_and_refuses_content(server: Server) -> None:
    *_, created = await exchange(server.url, "POST", versioned(8, True), b"done")
    location = created.headers["location"]
    headers = versioned(8, True, Upload_Offset="4") | PARTIAL
    (replay,) = await exchange(location, "PATCH", headers)
    assert replay.status == 204 and replay.headers["upload-complete"] == "?1"
    (refused,) = await exchange(location, "PATCH", headers, b"more")
    assert refused.status == 400
    assert json.loads(refused.body)["type"].endswith("#completed-upload")


@pytest.mark.parametrize(("version", "refused"), [(5, False), (6, True), (8, True)])
async def test_appends_must_be_partial_uploads_from_version_6(
    server: Server, version: int, refused: bool
) -> None:
    *_, created = await exchange(server.url, "POST", versioned(version, False), b"ab")
    headers = versioned(version, True, Upload_Offset="2", Content_Type="application/octet-stream")
    (answer,) = await exchange(created.headers["location"], "PATCH", headers, b"cd")
    assert answer.status == (415 if refused else 204)


@pytest.mark.parametrize("version", [3, 5])
async def test_old_versions_refuse_upload_fields_on_head_and_delete(
    server: Server, version: int
) -> None:
    *_, created = await exchange(server.url, "POST", versioned(version, False), b"ab")
    location = created.headers["location"]
    fields = {"Upload-Draft-Interop-Version": str(version), "Upload-Offset": "2"}
    (answer,) = await exchange(location, "HEAD", fields)
    assert answer.status == 400
    (answer,) = await exchange(location, "DELETE", fields)
    assert answer.status == 400
    assert (await head(location, version)).status == 204  # still there


# -- limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "key"), [(6, "expires"), (8, "max-age"), (None, "max-age")])
async def test_limits_from_max_size_and_expire_after(
    make_server: ServerFactory, version: int | None, key: str
) -> None:
    server = await make_server(max_size_bytes=1000, expire_after_s=3600)
    probe = {} if version is None else {"Upload-Draft-Interop-Version": str(version)}
    (options,) = await exchange(server.url, "OPTIONS", probe)
    assert options.headers["accept-patch"] == "application/partial-upload"
    assert limits_of(options) == {"max-size": 1000, key: 3600}
    headers = versioned(version, False, Upload_Length="1001")
    (refused,) = await exchange(server.url, "POST", headers)
    assert refused.status == 413 and limits_of(refused)["max-size"] == 1000
    (created,) = await exchange(server.url, "POST", versioned(version, False, Upload_Length="10"))
    assert 3590 <= limits_of(created)[key] <= 3600


async def test_limits_without_a_maximum_size(server: Server) -> None:
    (options,) = await exchange(server.url, "OPTIONS", {})
    assert limits_of(options) == {"max-age": int(server.settings.expire_after_s)}
    assert options.headers["tus-version"] == "1.0.0"  # the tus answer is all there too


# -- interruptions --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [5000, 300_000])  # read whole, and streamed
async def test_an_interrupted_creation_keeps_what_arrived(server: Server, size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    data = data[:size]
    headers = versioned(8, True, Content_Length=str(size))
    request = await RawRequest.start(server.url, "POST", headers)
    resumption = await request.response()
    assert resumption.status == 104  # after every check: the body is invited now
    location = resumption.headers["location"]
    half = size // 2
    await request.send(data[:half])
    await wait_until(request.is_read_by_server, what="the server read the first half")
    request.writer.transport.abort()

    async def offset_is_half() -> bool:
        state = await head(location, 8)
        return state.status == 204 and state.headers["upload-offset"] == str(half)

    await wait_until(offset_is_half, what="the first half committed")
    state = await head(location, 8)
    assert state.headers["upload-complete"] == "?0" and state.headers["upload-length"] == str(size)
    headers = versioned(8, True, Upload_Offset=str(half)) | PARTIAL
    (done,) = await exchange(location, "PATCH", headers, data[half:])
    assert done.status == 204 and done.headers["upload-complete"] == "?1"
    assert server.file_of(location).read_bytes() == data


async def test_an_interrupted_append_keeps_what_arrived(server: Server) -> None:
    (created,) = await exchange(server.url, "POST", versioned(6, False))
    location = created.headers["location"]
    data = b"z" * 200_000
    headers = versioned(6, True, Upload_Offset="0", Content_Length=str(len(data))) | PARTIAL
    request = await RawRequest.start(location, "PATCH", headers)
    await request.send(data[:120_000])
    await wait_until(request.is_read_by_server, what="the server read 120000 bytes")
    request.writer.transport.abort()

    async def committed() -> bool:
        return (await head(location, 6)).headers.get("upload-offset") == "120000"

    await wait_until(committed, what="120000 bytes committed")
    state = await head(location, 6)
    assert state.headers["upload-complete"] == "?0"
    assert state.headers["upload-length"] == "200000"  # the completing append declared it


# -- cancellation, digests, tokens ------------------------------------------------------------


@pytest.mark.parametrize("version", ALL_VERSIONS)
async def test_cancellation(server: Server, version: int | None) -> None:
    *_, created = await exchange(server.url, "POST", versioned(version, False), b"abc")
    location = created.headers["location"]
    probe = {} if version is None else {"Upload-Draft-Interop-Version": str(version)}
    (deleted,) = await exchange(location, "DELETE", probe or {"Upload-Complete": "?0"})
    assert deleted.status == 204
    assert (await head(location, version)).status in (404, 410)
    assert not server.file_of(location).exists()


def sha256_field(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


@pytest.mark.parametrize("field", ["Content-Digest", "Repr-Digest"])
async def test_a_creation_whose_digest_fails_keeps_nothing(server: Server, field: str) -> None:
    headers = versioned(8, True, **{field.replace("-", "_"): sha256_field(b"other")})
    *_, refused = await exchange(server.url, "POST", headers, b"content")
    assert refused.status == 400 and field.encode() in refused.body
    assert refused.headers["upload-complete"] == "?0"
    assert server.file_of(refused.headers["location"]).read_bytes() == b""
    headers = versioned(8, True, **{field.replace("-", "_"): sha256_field(b"content")})
    *_, created = await exchange(server.url, "POST", headers, b"content")
    assert created.status == 201 and created.headers["upload-complete"] == "?1"


async def test_an_append_whose_content_digest_fails_keeps_nothing(server: Server) -> None:
    *_, created = await exchange(server.url, "POST", versioned(8, False), b"ab")
    location = created.headers["location"]
    headers = versioned(8, False, Upload_Offset="2", Content_Digest=sha256_field(b"xx")) | PARTIAL
    (refused,) = await exchange(location, "PATCH", headers, b"cd")
    assert refused.status == 400
    assert (await head(location, 8)).headers["upload-offset"] == "2"
    headers = versioned(8, False, Upload_Offset="2", Content_Digest=sha256_field(b"cd")) | PARTIAL
    (appended,) = await exchange(location, "PATCH", headers, b"cd")
    assert appended.status == 204 and appended.headers["upload-offset"] == "4"


async def test_tokens_apply_to_draft_requests(make_server: ServerFactory) -> None:
    server = await make_server(secrets=("s",))
    (refused,) = await exchange(server.url, "POST", versioned(8, False), b"ab")
    assert refused.status == 401
    creator = issue_token("s", subject="phone", actions=("create", "upload"), ttl_s=60)
    *_, created = await exchange(server.url, "POST", versioned(8, False) | bearer(creator), b"ab")
    assert created.status == 201
    location = created.headers["location"]
    reader = issue_token("s", subject="phone", actions=("read",), ttl_s=60)
    headers = versioned(8, True, Upload_Offset="2") | PARTIAL | bearer(reader)
    (forbidden,) = await exchange(location, "PATCH", headers, b"cd")
    assert forbidden.status == 403
    stranger = issue_token("s", subject="other", actions=("upload",), ttl_s=60)
    headers = versioned(8, True, Upload_Offset="2") | PARTIAL | bearer(stranger)
    (hidden,) = await exchange(location, "PATCH", headers, b"cd")
    assert hidden.status == 404
    headers = versioned(8, True, Upload_Offset="2") | PARTIAL | bearer(creator)
    (done,) = await exchange(location, "PATCH", headers, b"cd")
    assert done.status == 204 and done.headers["upload-complete"] == "?1"
