"""The checksum and concatenation extensions over HTTP, against a real server, Redis and disk.

Checksum: a right `Upload-Checksum` keeps the bytes, a wrong one is 460 and keeps nothing,
and a checksummed body the client cuts short keeps nothing either. Concatenation: a final
upload is its partials' bytes in order, and every refused final creates nothing.
(Downloads and listings: test_download_and_listing.py; SHA-256 digests: test_repr_digest.py.)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiofiles.os
import aiohttp
import pytest

from tests.support.servers import Server, ServerFactory
from tests.support.tus import (
    OFFSET_STREAM,
    TUS,
    bearer,
    create_upload,
    head_offset,
    patch,
    patch_headers,
)
from tests.support.waiting import wait_until
from tusserver import protocol
from tusserver.auth import issue_token

ALGORITHMS = ("md5", "sha1", "sha256", "sha512")
BLOCK_BYTES = 4 * 2**20  # the server writes a body to disk in blocks of this size


def checksum_of(algorithm: str, data: bytes) -> str:
    digest = hashlib.new(algorithm, data).digest()
    return f"{algorithm} {base64.b64encode(digest).decode('ascii')}"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


async def listed_ids(http: aiohttp.ClientSession, server: Server, **headers: str) -> list[str]:
    async with http.get(server.url, params={"limit": "1000"}, headers=headers) as response:
        assert response.status == 200, await response.text()
        body = await response.json()
    return [upload["id"] for upload in body["uploads"]]


def files_on_disk(server: Server) -> set[str]:
    return {
        path.name for path in (server.settings.data_dir / "uploads").rglob("*") if path.is_file()
    }


# -- checksum --------------------------------------------------------------------------------


async def test_options_advertises_checksum_and_concatenation(
    server: Server, http: aiohttp.ClientSession
) -> None:
    async with http.options(server.url) as response:
        assert response.status == 204
        algorithms = response.headers["Tus-Checksum-Algorithm"].split(",")
        extensions = response.headers["Tus-Extension"].split(",")
    assert set(ALGORITHMS) <= set(algorithms)
    assert {"checksum", "concatenation"} <= set(extensions)
    assert "concatenation-unfinished" not in extensions


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_patch_with_the_right_checksum_keeps_the_bytes(
    server: Server, http: aiohttp.ClientSession, algorithm: str
) -> None:
    url = await create_upload(http, server.url, 20)
    assert (await patch(http, url, 0, b"hello")).status == 204
    checksum = checksum_of(algorithm, b"world")
    async with http.patch(
        url, data=b"world", headers=patch_headers(5, **{"Upload-Checksum": checksum})
    ) as response:
        assert response.status == 204
        assert response.headers["Upload-Offset"] == "10"
    assert await head_offset(http, url) == 10
    assert server.file_of(url).read_bytes() == b"helloworld"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_patch_with_a_wrong_checksum_is_460_and_keeps_nothing(
    server: Server, http: aiohttp.ClientSession, algorithm: str
) -> None:
    url = await create_upload(http, server.url, 20)
    assert (await patch(http, url, 0, b"hello")).status == 204
    wrong = checksum_of(algorithm, b"w0rld")
    async with http.patch(
        url, data=b"world", headers=patch_headers(5, **{"Upload-Checksum": wrong})
    ) as response:
        assert response.status == 460
        assert algorithm in await response.text()
    assert await head_offset(http, url) == 5
    assert server.file_of(url).read_bytes() == b"hello"
    # the client re-sends the chunk at the same offset, and only those bytes are kept
    resent = await patch(
        http, url, 5, b"WORLD", **{"Upload-Checksum": checksum_of(algorithm, b"WORLD")}
    )
    assert resent.status == 204
    assert await head_offset(http, url) == 10
    assert server.file_of(url).read_bytes() == b"helloWORLD"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_creation_with_upload_keeps_a_body_with_the_right_checksum(
    server: Server, http: aiohttp.ClientSession, algorithm: str
) -> None:
    headers = {
        **TUS,
        "Upload-Length": "20",
        "Content-Type": OFFSET_STREAM,
        "Upload-Checksum": checksum_of(algorithm, b"hello"),
    }
    async with http.post(server.url, data=b"hello", headers=headers) as response:
        assert response.status == 201
        assert response.headers["Upload-Offset"] == "5"
        url = response.headers["Location"]
    assert await head_offset(http, url) == 5
    assert server.file_of(url).read_bytes() == b"hello"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_creation_with_upload_and_a_wrong_checksum_is_460_and_keeps_nothing(
    server: Server, http: aiohttp.ClientSession, algorithm: str
) -> None:
    headers = {
        **TUS,
        "Upload-Length": "20",
        "Content-Type": OFFSET_STREAM,
        "Upload-Checksum": checksum_of(algorithm, b"HELLO"),
    }
    async with http.post(server.url, data=b"hello", headers=headers) as response:
        assert response.status == 460
        url = response.headers["Location"]  # the upload exists: the client may resume it
    assert await head_offset(http, url) == 0
    assert server.file_of(url).read_bytes() == b""
    assert (await patch(http, url, 0, b"hello")).status == 204
    assert server.file_of(url).read_bytes() == b"hello"


async def test_an_unsupported_checksum_algorithm_is_400_and_keeps_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    crc32 = {"Upload-Checksum": "crc32 AAAAAA=="}
    url = await create_upload(http, server.url, 20)
    assert (await patch(http, url, 0, b"hello", **crc32)).status == 400
    assert await head_offset(http, url) == 0
    assert server.file_of(url).read_bytes() == b""

    before = await listed_ids(http, server)
    headers = {**TUS, "Upload-Length": "20", "Content-Type": OFFSET_STREAM, **crc32}
    async with http.post(server.url, data=b"hello", headers=headers) as response:
        assert response.status == 400
        assert "crc32" in await response.text()
    assert await listed_ids(http, server) == before


@contextlib.asynccontextmanager
async def patch_in_flight(
    server: Server, url: str, offset: int, declared_length: int, **headers: str
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A PATCH over a raw socket that announces `declared_length` bytes and has sent one
    write block of them, which the server has written to the file; hangs up on exit."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    fields = {
        **patch_headers(offset, **headers),
        "Host": parts.netloc,
        "Content-Length": str(declared_length),
    }
    head = f"PATCH {parts.path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    path_on_disk = server.file_of(url)
    try:
        writer.write(head.encode("ascii") + b"\r\n" + os.urandom(BLOCK_BYTES))
        await writer.drain()

        async def block_on_disk() -> bool:
            return await aiofiles.os.path.getsize(path_on_disk) >= offset + BLOCK_BYTES

        await wait_until(block_on_disk)
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def wait_until_unlocked(server: Server, url: str) -> None:
    """Poll until no request holds the upload's lock: the cut request has run to its end
    (a HEAD or PATCH now would ask a running holder to commit or stop instead)."""

    async def is_free() -> bool:
        return not await server.is_locked(url)

    await wait_until(is_free)


async def test_a_checksummed_patch_cut_short_keeps_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 3 * BLOCK_BYTES)
    assert (await patch(http, url, 0, b"hello")).status == 204
    checksum = checksum_of("sha256", b"the whole body, never sent")
    async with patch_in_flight(server, url, 5, 2 * BLOCK_BYTES, **{"Upload-Checksum": checksum}):
        pass  # then hang up, with a block of the body already on disk
    await wait_until_unlocked(server, url)
    assert await head_offset(http, url) == 5
    assert server.file_of(url).read_bytes() == b"hello"
    assert (await patch(http, url, 5, b"world")).status == 204
    assert server.file_of(url).read_bytes() == b"helloworld"


async def test_a_plain_patch_cut_short_keeps_what_arrived(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """The contrast to the test above: the same hang-up without a checksum commits the block."""
    url = await create_upload(http, server.url, 3 * BLOCK_BYTES)
    assert (await patch(http, url, 0, b"hello")).status == 204
    async with patch_in_flight(server, url, 5, 2 * BLOCK_BYTES):
        pass  # then hang up
    await wait_until_unlocked(server, url)
    assert await head_offset(http, url) == 5 + BLOCK_BYTES
    assert server.file_of(url).stat().st_size == 5 + BLOCK_BYTES


# -- concatenation -------------------------------------------------------------------------


async def upload_partials(
    http: aiohttp.ClientSession, server: Server, parts: list[bytes], **headers: str
) -> list[str]:
    """Create and fill one partial upload per part; their URLs."""
    urls = []
    for data in parts:
        url = await create_upload(
            http, server.url, len(data), **{"Upload-Concat": "partial"}, **headers
        )
        assert (await patch(http, url, 0, data, **headers)).status == 204
        urls.append(url)
    return urls


def reference(url: str, style: str) -> str:
    """How a final names a partial: its absolute URL, the same path on another scheme and
    host (only the path counts), or the plain path."""
    path = urlsplit(url).path
    styles = {"absolute": url, "other-host": f"https://uploads.example.com{path}", "path": path}
    return styles[style]


@pytest.mark.parametrize("style", ["absolute", "other-host", "path"])
async def test_a_final_upload_is_its_partials_in_order(
    server: Server, http: aiohttp.ClientSession, style: str
) -> None:
    parts = [os.urandom(1000), b"|", os.urandom(70_000)]
    urls = await upload_partials(http, server, parts)
    concat = "final;" + " ".join(reference(url, style) for url in urls)
    headers = {**TUS, "Upload-Concat": concat, "Upload-Metadata": f"filename {b64('all.bin')}"}
    async with http.post(server.url, headers=headers) as response:
        assert response.status == 201, await response.text()
        final_url = response.headers["Location"]
    whole = b"".join(parts)

    async with http.get(final_url) as response:
        assert response.status == 200
        assert await response.read() == whole
        assert "all.bin" in response.headers["Content-Disposition"]
    async with http.head(final_url, headers=TUS) as response:
        assert response.status == 200
        assert response.headers["Upload-Length"] == str(len(whole))
        assert response.headers["Upload-Offset"] == str(len(whole))
        digest = base64.b64encode(hashlib.sha256(whole).digest()).decode()
        assert response.headers["Repr-Digest"] == f"sha-256=:{digest}:"
        listed = protocol.parse_concat(response.headers["Upload-Concat"])
    assert listed is not None and listed.is_final
    assert list(listed.partial_paths) == [urlsplit(url).path for url in urls]


async def test_a_final_upload_cannot_be_patched(
    server: Server, http: aiohttp.ClientSession
) -> None:
    urls = await upload_partials(http, server, [b"ab", b"cd"])
    async with http.post(
        server.url, headers={**TUS, "Upload-Concat": "final;" + " ".join(urls)}
    ) as response:
        assert response.status == 201
        final_url = response.headers["Location"]
    assert (await patch(http, final_url, 4, b"ef")).status == 403
    async with http.get(final_url) as response:
        assert await response.read() == b"abcd"


async def test_a_partial_upload_says_so_on_creation_and_head(
    server: Server, http: aiohttp.ClientSession
) -> None:
    headers = {**TUS, "Upload-Length": "3", "Upload-Concat": "partial"}
    async with http.post(server.url, headers=headers) as response:
        assert response.status == 201
        assert response.headers["Upload-Concat"] == "partial"
        url = response.headers["Location"]
    async with http.head(url, headers=TUS) as response:
        assert response.status == 200
        assert response.headers["Upload-Concat"] == "partial"
        assert response.headers["Upload-Offset"] == "0"


async def test_a_partial_may_serve_two_finals(server: Server, http: aiohttp.ClientSession) -> None:
    first, second = await upload_partials(http, server, [b"ab", b"cd"])
    finals = []
    for concat in (f"final;{first} {second}", f"final;{second} {first}"):
        async with http.post(server.url, headers={**TUS, "Upload-Concat": concat}) as response:
            assert response.status == 201
            finals.append(response.headers["Location"])
    bodies = []
    for url in finals:
        async with http.get(url) as response:
            bodies.append(await response.read())
    assert bodies == [b"abcd", b"cdab"]


async def test_a_final_naming_a_partial_twice_is_refused(
    server: Server, http: aiohttp.ClientSession
) -> None:
    """One partial named again and again would cost a copy each time (a 1 GB partial named
    a thousand times is a terabyte): each partial may be named once."""
    first, second = await upload_partials(http, server, [b"ab", b"cd"])
    await assert_final_refused(http, server, f"final;{first} {second} {first}")


async def test_a_final_of_more_parts_than_allowed_is_refused(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(max_concat_parts=2)
    parts = await upload_partials(http, server, [b"a", b"b", b"c"])
    await assert_final_refused(http, server, "final;" + " ".join(parts))
    async with http.post(
        server.url, headers={**TUS, "Upload-Concat": "final;" + " ".join(parts[:2])}
    ) as response:
        assert response.status == 201


async def assert_final_refused(
    http: aiohttp.ClientSession, server: Server, concat: str, **headers: str
) -> None:
    """POST a final upload that must be refused (4xx) and create nothing."""
    ids_before, files_before = await listed_ids(http, server, **headers), files_on_disk(server)
    async with http.post(
        server.url, headers={**TUS, "Upload-Concat": concat, **headers}
    ) as response:
        assert 400 <= response.status < 500, response.status
        assert "Location" not in response.headers
        assert await response.text()
    assert await listed_ids(http, server, **headers) == ids_before
    assert files_on_disk(server) == files_before


async def test_a_final_of_an_unknown_upload_is_refused(
    server: Server, http: aiohttp.ClientSession
) -> None:
    (url,) = await upload_partials(http, server, [b"ab"])
    unknown = server.url + "0" * len(url.rsplit("/", 1)[1])
    await assert_final_refused(http, server, f"final;{url} {unknown}")
    await assert_final_refused(
        http, server, f"final;{url} {server.root}/elsewhere/{url.rsplit('/', 1)[1]}"
    )


async def test_a_final_of_an_unfinished_partial_is_refused(
    server: Server, http: aiohttp.ClientSession
) -> None:
    (done,) = await upload_partials(http, server, [b"ab"])
    unfinished = await create_upload(http, server.url, 10, **{"Upload-Concat": "partial"})
    assert (await patch(http, unfinished, 0, b"12345")).status == 204
    await assert_final_refused(http, server, f"final;{done} {unfinished}")


async def test_a_final_of_a_non_partial_upload_is_refused(
    server: Server, http: aiohttp.ClientSession
) -> None:
    (partial,) = await upload_partials(http, server, [b"ab"])
    plain = await create_upload(http, server.url, 2)
    assert (await patch(http, plain, 0, b"cd")).status == 204
    await assert_final_refused(http, server, f"final;{partial} {plain}")


async def test_a_final_with_upload_length_is_refused(
    server: Server, http: aiohttp.ClientSession
) -> None:
    urls = await upload_partials(http, server, [b"ab", b"cd"])
    await assert_final_refused(http, server, "final;" + " ".join(urls), **{"Upload-Length": "4"})


async def test_a_final_of_another_owners_partial_is_refused(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=("s",))
    actions = ["create", "upload", "read"]
    alice = bearer(issue_token("s", subject="alice", actions=actions, ttl_s=600))
    bob = bearer(issue_token("s", subject="bob", actions=actions, ttl_s=600))
    (alices,) = await upload_partials(http, server, [b"ab"], **alice)
    (bobs,) = await upload_partials(http, server, [b"cd"], **bob)
    alice_ids = await listed_ids(http, server, **alice)
    await assert_final_refused(http, server, f"final;{bobs} {alices}", **bob)
    assert await listed_ids(http, server, **alice) == alice_ids
    # the same request of alice's own partials is accepted: the refusal was about the owner
    async with http.post(
        server.url, headers={**TUS, "Upload-Concat": f"final;{alices}", **alice}
    ) as response:
        assert response.status == 201


async def test_a_refused_final_leaves_a_running_partial_upload_alone(
    server: Server, http: aiohttp.ClientSession
) -> None:
    (done,) = await upload_partials(http, server, [b"ab"])
    running = await create_upload(http, server.url, 2 * BLOCK_BYTES, **{"Upload-Concat": "partial"})
    async with patch_in_flight(server, running, 0, 2 * BLOCK_BYTES) as (reader, writer):
        await assert_final_refused(http, server, f"final;{done} {running}")
        writer.write(os.urandom(BLOCK_BYTES))  # the rest of the body
        await writer.drain()
        async with asyncio.timeout(20):
            status_line = await reader.readline()
    assert status_line.startswith(b"HTTP/1.1 204"), status_line
    assert await head_offset(http, running) == 2 * BLOCK_BYTES


# -- cases of the public tus conformance suite ----------------------------------------------


async def test_a_creation_body_of_another_content_type_is_415_and_creates_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    headers = {**TUS, "Upload-Length": "3", "Content-Type": "text/plain"}
    async with http.post(server.url, data=b"abc", headers=headers) as response:
        assert response.status == 415
        assert "Location" not in response.headers
    assert await listed_ids(http, server) == []
    assert files_on_disk(server) == set()


async def test_a_checksum_of_the_wrong_length_is_460_and_keeps_nothing(
    server: Server, http: aiohttp.ClientSession
) -> None:
    url = await create_upload(http, server.url, 3)
    short = base64.b64encode(bytes(10)).decode()
    response = await patch(http, url, 0, b"abc", **{"Upload-Checksum": f"sha1 {short}"})
    assert response.status == 460
    assert await head_offset(http, url) == 0


async def test_a_final_upload_with_a_body_is_refused(
    server: Server, http: aiohttp.ClientSession
) -> None:
    first, second = await upload_partials(http, server, [b"ab", b"cd"])
    ids_before, files_before = await listed_ids(http, server), files_on_disk(server)
    headers = {**TUS, "Upload-Concat": f"final;{first} {second}", "Content-Type": OFFSET_STREAM}
    async with http.post(server.url, data=b"xyz", headers=headers) as response:
        assert response.status == 400
        assert "Location" not in response.headers
    assert await listed_ids(http, server) == ids_before
    assert files_on_disk(server) == files_before
