"""Form uploads: a plain multipart/form-data POST to the endpoint (no tus client) stores every
file part as a completed upload through the same write path as PATCH, against real servers."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from tests.support.events import all_events, event_types
from tests.support.files import file_of
from tests.support.processes import (
    BODY_PEAK_GROWTH_MIB,
    ServerProcess,
    StartProcess,
    memory_kib,
    start_server,
)
from tests.support.raw_http import RawRequest, authority_of, exchange, request_bytes
from tests.support.servers import Server, ServerFactory
from tests.support.tools import require_tool
from tests.support.tus import TUS, bearer, repr_digest_of, upload_id_of
from tests.support.waiting import wait_until
from tusserver.auth import issue_token
from tusserver.uploads.body import WRITE_BLOCK_BYTES


def form(*files: tuple[str, bytes | io.BytesIO, str], **fields: str) -> aiohttp.FormData:
    """A multipart form: the text fields first (as a page lists them), then the files; names
    unquoted, as curl and browsers send them."""
    data = aiohttp.FormData(quote_fields=False)
    for name, value in fields.items():
        data.add_field(name, value)
    for filename, content, content_type in files:
        data.add_field("file", content, filename=filename, content_type=content_type)
    return data


async def post_form(
    http: aiohttp.ClientSession, url: str, data: Any, **headers: str
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, data=data, headers=headers) as response:
        if response.content_type == "application/json":
            return response.status, cast(dict[str, Any], await response.json())
        return response.status, {"text": await response.text()}


async def stored_uploads(server: Server, owner: str = "anonymous") -> list[str]:
    return [upload.upload_id for upload in await server.uploads.list_owned(owner, None, 100)]


async def test_one_file_becomes_a_completed_upload_with_its_digest_and_events(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    content = os.urandom(100_000)
    status, answer = await post_form(http, server.url, form(("a b.bin", content, "image/png")))
    assert status == 201, answer
    (upload,) = answer["uploads"]
    assert upload["length"] == len(content)
    assert upload["sha256"] == hashlib.sha256(content).hexdigest()
    assert upload["metadata"] == {"filename": "a b.bin", "filetype": "image/png"}
    assert upload["url"] == server.url + upload["id"]
    assert server.file_of(upload["url"]).read_bytes() == content
    assert await event_types(flushed_redis, upload["id"]) == ["created", "completed"]
    async with http.head(upload["url"], headers=TUS) as response:
        assert response.headers["Upload-Offset"] == str(len(content))
        assert response.headers["Repr-Digest"] == repr_digest_of(content)
    async with http.get(upload["url"]) as response:
        assert response.status == 200
        assert await response.read() == content


async def test_several_files_each_get_the_text_fields_as_metadata(
    server: Server, http: aiohttp.ClientSession
) -> None:
    files = [(f"f{n}.txt", os.urandom(1000 * n), "text/plain") for n in range(3)]
    status, answer = await post_form(http, server.url, form(*files, album="holidays", note="été"))
    assert status == 201, answer
    assert len(answer["uploads"]) == 3
    for (filename, content, _), upload in zip(files, answer["uploads"], strict=True):
        assert upload["metadata"] == {
            "album": "holidays", "note": "été", "filename": filename, "filetype": "text/plain",
        }  # fmt: skip
        assert upload["length"] == len(content)
        assert upload["sha256"] == hashlib.sha256(content).hexdigest()
        assert server.file_of(upload["url"]).read_bytes() == content


async def test_a_file_larger_than_a_block_streams_whole_and_an_empty_one_completes(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    big = os.urandom(3 * WRITE_BLOCK_BYTES + 12345)
    data = form(
        ("big.bin", io.BytesIO(big), "application/octet-stream"), ("empty", b"", "text/plain")
    )
    status, answer = await post_form(http, server.url, data)
    assert status == 201, answer
    large, empty = answer["uploads"]
    assert (large["length"], large["sha256"]) == (len(big), hashlib.sha256(big).hexdigest())
    assert server.file_of(large["url"]).read_bytes() == big
    assert (empty["length"], empty["sha256"]) == (0, hashlib.sha256().hexdigest())
    assert await event_types(flushed_redis, empty["id"]) == ["created", "completed"]


async def test_a_part_past_max_size_is_413_and_nothing_is_kept(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_size_bytes=1000)
    data = form(("ok.bin", b"x" * 10, "text/plain"), ("big.bin", b"y" * 5000, "text/plain"))
    status, _ = await post_form(http, server.url, data)
    assert status == 413
    assert await stored_uploads(server) == []


async def test_files_that_together_pass_max_size_are_413_and_none_of_them_is_kept(
    make_server: ServerFactory, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    """Each part fits alone; the second takes the form past --max-size. The first, already
    completed, is removed too, and the parent's events say so (completed, then terminated)."""
    server = await make_server(max_size_bytes=1000)
    data = form(("one.bin", b"1" * 600, "text/plain"), ("two.bin", b"2" * 600, "text/plain"))
    async with http.post(server.url, data=data) as response:
        assert response.status == 413
        reason = await response.text()
    assert "600 bytes of this request's earlier files" in reason
    assert "maximum of 1000 bytes" in reason
    assert await stored_uploads(server) == []
    assert [path for path in server.settings.data_dir.rglob("uploads/*/*") if path.is_file()] == []
    by_upload: dict[str, list[str]] = {}
    for event in await all_events(flushed_redis):
        by_upload.setdefault(event["upload_id"], []).append(event["type"])
    assert sorted(by_upload.values()) == [
        ["created", "completed", "terminated"],  # one.bin: stored whole, then removed
        ["created", "terminated"],  # two.bin: refused as it streamed
    ]


async def test_files_that_together_fill_max_size_exactly_are_kept(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_size_bytes=1000)
    data = form(("one.bin", b"1" * 600, "text/plain"), ("two.bin", b"2" * 400, "text/plain"))
    status, answer = await post_form(http, server.url, data)
    assert status == 201, answer
    assert [upload["length"] for upload in answer["uploads"]] == [600, 400]


async def test_a_tokens_maximum_bounds_the_forms_files_together(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("s",))
    token = issue_token("s", subject="alice", actions=("create",), ttl_s=60, max_size_bytes=100)
    data = form(("one.bin", b"1" * 60, "text/plain"), ("two.bin", b"2" * 60, "text/plain"))
    async with http.post(server.url, data=data, headers=bearer(token)) as response:
        assert response.status == 413
        assert "this token's maximum of 100 bytes" in await response.text()
    assert await stored_uploads(server, "alice") == []


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n\r\nabc\r\n--x--\r\n"),  # no boundary parameter
        ("multipart/form-data; boundary=right", b"--wrong\r\n\r\nabc\r\n--wrong--\r\n"),
        (  # a file part cut before its closing boundary
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\n' + b"z" * 500,
        ),
        (  # a text field after a file part
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="f"; filename="a"\r\n\r\nzz\r\n'
            b'--b\r\nContent-Disposition: form-data; name="late"\r\n\r\nv\r\n--b--\r\n',
        ),
        ("multipart/form-data; boundary=b", b"--b--\r\n"),  # no file at all
    ],
    ids=["no-boundary", "wrong-boundary", "cut-part", "field-after-file", "no-file"],
)
async def test_a_malformed_form_is_400_and_nothing_is_kept(
    server: Server, http: aiohttp.ClientSession, content_type: str, body: bytes
) -> None:
    status, answer = await post_form(http, server.url, body, **{"Content-Type": content_type})
    assert status == 400, answer
    assert await stored_uploads(server) == []


def file_part(filename: str, content: bytes, *extra_headers: bytes) -> bytes:
    """One file part of a form whose boundary is `b`, with `extra_headers` lines."""
    head = f'--b\r\nContent-Disposition: form-data; name="f"; filename="{filename}"\r\n'
    return head.encode() + b"".join(line + b"\r\n" for line in extra_headers) + b"\r\n" + content


@pytest.mark.parametrize(
    "bad_part",
    [
        file_part("two", b"2" * 100, b"X-Long: " + b"x" * 10_000),  # past aiohttp's 8190 a line
        file_part("two", b"2" * 100, *(f"X-{n}: v".encode() for n in range(200))),  # 128 lines
    ],
    ids=["part-header-line-too-long", "too-many-part-header-lines"],
)
async def test_a_part_with_oversized_headers_is_400_and_the_form_keeps_nothing(
    server: Server, http: aiohttp.ClientSession, bad_part: bytes
) -> None:
    """The first part is stored whole before the second's headers are read: it goes too."""
    body = file_part("one", b"1" * 100) + b"\r\n" + bad_part + b"\r\n--b--\r\n"
    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    status, answer = await post_form(http, server.url, body, **headers)
    assert status == 400, answer
    assert "malformed" in answer["text"]
    assert await stored_uploads(server) == []


async def test_a_request_header_block_past_max_header_size_is_431_and_nothing_is_stored(
    make_server: ServerFactory,
) -> None:
    server = await make_server(max_header_bytes=8 * 2**10)
    body = file_part("one", b"1" * 100) + b"\r\n--b--\r\n"
    pads = [(f"X-Pad-{n}", "a" * 1000) for n in range(9)]  # 9 KB, no line over 1 KB
    headers = [
        ("Host", authority_of(server.url)), ("Content-Type", "multipart/form-data; boundary=b"),
        ("Content-Length", str(len(body))),
    ]  # fmt: skip
    fits = await exchange(server.url, request_bytes("POST", "/files/", headers, body))
    assert fits.status == 201  # the same form under the limit is stored
    (kept,) = await stored_uploads(server)
    refused = await exchange(server.url, request_bytes("POST", "/files/", headers + pads, body))
    assert refused.status == 431
    assert await stored_uploads(server) == [kept]


@pytest.mark.parametrize(
    ("fields", "files", "bound"),
    [(4, 1, "text fields"), (0, 4, "files")],
    ids=["too-many-fields", "too-many-files"],
)
async def test_a_form_with_too_many_parts_is_400_and_keeps_nothing(
    make_server: ServerFactory, http: aiohttp.ClientSession, fields: int, files: int, bound: str
) -> None:
    server = await make_server(max_form_fields=3, max_form_files=3)
    data = form(
        *((f"f{n}.txt", b"x", "text/plain") for n in range(files)),
        **{f"field{n}": "v" for n in range(fields)},
    )
    status, answer = await post_form(http, server.url, data)
    assert status == 400, answer
    assert f"at most 3 {bound}" in answer["text"]
    assert await stored_uploads(server) == []


async def test_a_field_longer_than_the_bound_is_400(
    server: Server, http: aiohttp.ClientSession
) -> None:
    data = form(("a.txt", b"abc", "text/plain"), title="t" * 5000)
    status, _ = await post_form(http, server.url, data)
    assert status == 400
    assert await stored_uploads(server) == []


async def test_a_secured_server_needs_a_token_with_the_create_scope(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("s",))

    def token(*actions: str) -> dict[str, str]:
        return bearer(issue_token("s", subject="alice", actions=actions, ttl_s=60))

    files = ("a.txt", b"hello", "text/plain")
    assert (await post_form(http, server.url, form(files)))[0] == 401
    assert (await post_form(http, server.url, form(files), **token("read", "upload")))[0] == 403
    status, answer = await post_form(http, server.url, form(files), **token("create", "read"))
    assert status == 201, answer
    assert await stored_uploads(server, "alice") == [answer["uploads"][0]["id"]]
    async with http.get(answer["uploads"][0]["url"], headers=token("read")) as response:
        assert await response.read() == b"hello"


async def test_a_tus_request_with_a_multipart_content_type_is_still_tus(
    server: Server, http: aiohttp.ClientSession
) -> None:
    headers = {**TUS, "Upload-Length": "3", "Content-Type": "multipart/form-data; boundary=b"}
    async with http.post(server.url, headers=headers) as response:
        assert response.status == 201
        assert upload_id_of(response.headers["Location"])


async def test_curl_f_uploads_a_file_past_expect_100_continue(
    server: Server, tmp_path: Path
) -> None:
    require_tool(shutil.which("curl") is not None, "curl is not installed")
    content = os.urandom(3 * 2**20)  # curl asks `Expect: 100-continue` past 1 MiB
    (tmp_path / "big.iso").write_bytes(content)
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-F", "title=holidays", "-F", f"file=@{tmp_path / 'big.iso'}", server.url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await curl.communicate()
    assert curl.returncode == 0
    (upload,) = json.loads(output)["uploads"]
    assert upload["metadata"] == {
        "title": "holidays", "filename": "big.iso", "filetype": "application/octet-stream",
    }  # fmt: skip
    assert upload["sha256"] == hashlib.sha256(content).hexdigest()
    assert server.file_of(upload["url"]).read_bytes() == content


async def test_a_hang_up_mid_form_removes_every_upload_of_the_request(server: Server) -> None:
    whole = b'--b\r\nContent-Disposition: form-data; name="f"; filename="one"\r\n\r\n'
    whole += b"1" * 1000 + b"\r\n"
    cut = b'--b\r\nContent-Disposition: form-data; name="f"; filename="two"\r\n\r\n'
    headers = {"Content-Type": "multipart/form-data; boundary=b", "Content-Length": "1000000"}
    request = await RawRequest.start(server.url, "POST", headers)
    await request.send(whole + cut + b"2" * 200_000)  # past the parser's look-ahead

    async def both_exist() -> bool:
        return len(await stored_uploads(server)) == 2

    await wait_until(both_exist)  # the first is complete, the second is receiving
    await request.close()

    async def none_left() -> bool:
        return await stored_uploads(server) == []

    await wait_until(none_left)


async def test_a_redirect_field_to_an_allowed_origin_answers_303_with_the_ids(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(cors_origins=("https://app.example",))
    data = form(("a.txt", b"abc", "text/plain"), redirect="https://app.example/done?x=1")
    async with http.post(server.url, data=data, allow_redirects=False) as response:
        assert response.status == 303
        location = response.headers["Location"]
    (upload_id,) = await stored_uploads(server)
    assert location == f"https://app.example/done?x=1&uploads={upload_id}"
    upload = await server.uploads.get(upload_id, "anonymous")
    assert "redirect" not in upload.metadata


async def test_a_redirect_to_the_servers_own_origin_is_followed(
    server: Server, http: aiohttp.ClientSession
) -> None:
    own = server.root + "/thanks"
    data = form(("a.txt", b"abc", "text/plain"), redirect=own)
    async with http.post(server.url, data=data, allow_redirects=False) as response:
        assert response.status == 303
        assert response.headers["Location"].startswith(own + "?uploads=")


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "javascript:alert(1)", "/relative", "ftp://app.example/"]
)
async def test_a_redirect_elsewhere_is_400_and_nothing_is_kept(
    make_server: ServerFactory, http: aiohttp.ClientSession, target: str
) -> None:
    server = await make_server(cors_origins=("https://app.example",))
    data = form(("a.txt", b"abc", "text/plain"), redirect=target)
    status, _ = await post_form(http, server.url, data)
    assert status == 400
    assert await stored_uploads(server) == []


async def cookie_server(make_server: ServerFactory) -> tuple[Server, dict[str, str]]:
    server = await make_server(
        secrets=("s",), token_cookie="tus_token", cors_origins=("https://app.example",)
    )
    token = issue_token("s", subject="alice", actions=("create", "read"), ttl_s=60)
    return server, {"Cookie": f"tus_token={token}"}


@pytest.mark.parametrize(
    "source",
    [
        {"Origin": "https://app.example"},
        {"Referer": "https://app.example/upload.html"},
        {"Origin": "own"},
    ],
    ids=["allowed-origin", "allowed-referer", "own-origin"],
)
async def test_a_cookie_token_is_accepted_from_an_allowed_origin(
    make_server: ServerFactory, http: aiohttp.ClientSession, source: dict[str, str]
) -> None:
    server, cookie = await cookie_server(make_server)
    origin = {name: server.root if value == "own" else value for name, value in source.items()}
    data = form(("a.txt", b"abc", "text/plain"))
    status, answer = await post_form(http, server.url, data, **cookie, **origin)
    assert status == 201, answer
    assert await stored_uploads(server, "alice") == [answer["uploads"][0]["id"]]


@pytest.mark.parametrize(
    "source",
    [{"Origin": "https://evil.example"}, {"Referer": "https://evil.example/x"}, {}],
    ids=["other-origin", "other-referer", "no-origin-nor-referer"],
)
async def test_a_cookie_token_is_refused_from_elsewhere_or_without_origin(
    make_server: ServerFactory, http: aiohttp.ClientSession, source: dict[str, str]
) -> None:
    server, cookie = await cookie_server(make_server)
    data = form(("a.txt", b"abc", "text/plain"))
    status, _ = await post_form(http, server.url, data, **cookie, **source)
    assert status == 401
    assert await stored_uploads(server, "alice") == []


async def test_a_download_link_may_use_the_cookie_without_origin(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server, cookie = await cookie_server(make_server)
    data = form(("a.txt", b"abc", "text/plain"))
    status, answer = await post_form(http, server.url, data, Origin=server.root, **cookie)
    assert status == 201, answer
    async with http.get(answer["uploads"][0]["url"], headers=cookie) as response:
        assert response.status == 200
        assert await response.read() == b"abc"
    evil = {"Origin": "https://evil.example", **cookie}
    async with http.get(answer["uploads"][0]["url"], headers=evil) as response:
        assert response.status == 401


# -- a 2 GiB part, streamed in bounded memory: curl -F and aiohttp's MultipartWriter --------

BIG_PART_BYTES = 2 * 2**30
MARK_EVERY_BYTES = 64 * 2**20


def sha256_of(path: Path) -> str:
    running = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(4 * 2**20):
            running.update(block)
    return running.hexdigest()


@pytest.fixture(scope="module")
def big_part(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2 GiB file, sparse but for 4 KiB of random bytes every 64 MiB and at its end (so a
    block stored at the wrong place changes the digest), and its SHA-256: never in memory."""
    path = tmp_path_factory.mktemp("big") / "big.iso"
    with path.open("wb") as file:
        file.truncate(BIG_PART_BYTES)
        for offset in [*range(0, BIG_PART_BYTES, MARK_EVERY_BYTES), BIG_PART_BYTES - 4096]:
            file.seek(offset)
            file.write(os.urandom(4096))
    assert path.stat().st_size == BIG_PART_BYTES
    return path, sha256_of(path)


async def big_form_server(processes: StartProcess, tmp_path: Path) -> tuple[ServerProcess, int]:
    """A tusserver process (as the big-PATCH memory test runs it) and its peak memory now."""
    server = await start_server(processes, tmp_path / "data", "--fsync", "never")
    return server, memory_kib(server.process.pid, "VmHWM")


async def assert_big_part_stored(
    server: ServerProcess, answer: dict[str, Any], digest: str, peak_before: int
) -> None:
    (upload,) = answer["uploads"]
    assert upload["length"] == BIG_PART_BYTES
    assert upload["sha256"] == digest
    assert upload["metadata"] == {
        "album": "big", "filename": "big.iso", "filetype": "application/x-iso9660-image",
    }  # fmt: skip
    stored = file_of(server.data_dir, upload["id"])
    assert stored.stat().st_size == BIG_PART_BYTES
    assert await asyncio.to_thread(sha256_of, stored) == digest
    grown_mib = (memory_kib(server.process.pid, "VmHWM") - peak_before) / 1024
    assert grown_mib < BODY_PEAK_GROWTH_MIB, f"the peak grew by {grown_mib:.0f} MiB for 2 GiB"


@pytest.mark.slow
async def test_curl_f_streams_a_2_gib_part_in_bounded_memory(
    processes: StartProcess, tmp_path: Path, big_part: tuple[Path, str]
) -> None:
    require_tool(shutil.which("curl") is not None, "curl is not installed")
    server, peak_before = await big_form_server(processes, tmp_path)
    curl = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--fail-with-body", "-F", "album=big",
        "-F", f"file=@{big_part[0]};type=application/x-iso9660-image", server.url,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    output, _ = await curl.communicate()
    assert curl.returncode == 0, output
    await assert_big_part_stored(server, json.loads(output), big_part[1], peak_before)


@pytest.mark.slow
async def test_aiohttp_multipart_writer_streams_a_2_gib_part_in_bounded_memory(
    processes: StartProcess, tmp_path: Path, http: aiohttp.ClientSession, big_part: tuple[Path, str]
) -> None:
    server, peak_before = await big_form_server(processes, tmp_path)
    with big_part[0].open("rb") as file, aiohttp.MultipartWriter("form-data") as writer:
        writer.append("big").set_content_disposition("form-data", name="album")
        part = writer.append(file, {"Content-Type": "application/x-iso9660-image"})
        part.set_content_disposition("form-data", name="file", filename="big.iso")
        assert writer.size is not None  # sent with a Content-Length, as a browser sends it
        status, answer = await post_form(http, server.url, writer)
    assert status == 201, answer
    await assert_big_part_stored(server, answer, big_part[1], peak_before)
