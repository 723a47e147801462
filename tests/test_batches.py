"""Batches (docs/events.md): a set of uploads that completes once, with one `batch.completed`
event listing every member; opened with POST or named in the metadata; sealed; read;
terminated; expired; paths checked; tokens bound to one batch and to a number of files or
bytes. In a server in this process, on the tests' Redis."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio

from tests.support.servers import Server, ServerFactory
from tests.support.tus import TUS, bearer, patch, upload_id_of
from tusserver.auth import issue_token
from tusserver.store.records import SHARD_COUNT, batch_key_of, redis_key, shard_of
from tusserver.uploads import expiry

SECRET = "batch-test-secret"


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


def joining(batch: str, path: str, length: int, *, key: str = "path") -> dict[str, str]:
    """The headers of a creation of `length` bytes that joins `batch` under `path`."""
    return {
        **TUS,
        "Upload-Length": str(length),
        "Upload-Metadata": metadata(batch=batch, **{key: path}),
    }


async def open_batch(
    http: aiohttp.ClientSession, server: Server, body: dict[str, Any] | None = None, **headers: str
) -> dict[str, Any]:
    async with http.post(server.url + "batches", json=body or {}, headers=headers) as response:
        assert response.status == 201, await response.text()
        opened = cast(dict[str, Any], await response.json())
        assert response.headers["Location"] == opened["url"]
        return opened


async def get_batch(
    http: aiohttp.ClientSession, server: Server, name: str, **headers: str
) -> tuple[int, dict[str, Any]]:
    async with http.get(server.url + f"batches/{name}", headers=headers) as response:
        if response.status != 200:
            return response.status, {"reason": await response.text()}
        return 200, cast(dict[str, Any], await response.json())


async def send_file(
    http: aiohttp.ClientSession,
    server: Server,
    data: bytes,
    *,
    chunk: int | None = None,
    headers: dict[str, str] | None = None,
    **meta: str,
) -> str:
    """Create an upload with `meta` and send `data` in PATCHes of `chunk` bytes; its URL."""
    sent = {**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": metadata(**meta)}
    async with http.post(server.url, headers={**sent, **(headers or {})}) as response:
        assert response.status == 201, await response.text()
        url = response.headers["Location"]
    step = chunk or max(len(data), 1)
    for offset in range(0, len(data), step):
        answer = await patch(http, url, offset, data[offset : offset + step], **(headers or {}))
        assert answer.status == 204, answer
    return url


async def batch_events(redis_url: str, owner: str, name: str) -> list[dict[str, str]]:
    """The batch's events in its shard's stream, oldest first."""
    stream = redis_key(shard_of(batch_key_of(owner, name)), "events")
    async with redis.asyncio.Redis.from_url(redis_url, decode_responses=True) as client:
        entries = cast(list[tuple[str, dict[str, str]]], await client.xrange(stream))
    return [f for _id, f in entries if f["type"].startswith("batch.") and f["batch"] == name]


async def test_a_batch_completes_once_when_its_expected_files_are_complete(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    opened = await open_batch(http, server, {"files": 3, "metadata": {"project": "alpha"}})
    name = opened["id"]
    assert opened["state"] == "open" and opened["expected"] == {"files": 3, "bytes": None}
    files = {"a.txt": b"alpha", "dir/b.bin": b"\x00" * 5000, "dir/sub/c": b""}
    urls = {}
    for path, data in list(files.items())[:2]:
        urls[path] = await send_file(
            http, server, data, chunk=1024, batch=name, relativePath=path, filename="x"
        )
        assert (await get_batch(http, server, name))[1]["state"] == "open"
    assert await batch_events(flushed_redis, "anonymous", name) == []
    urls["dir/sub/c"] = await send_file(http, server, b"", batch=name, relativePath="dir/sub/c")

    status, view = await get_batch(http, server, name)
    assert status == 200 and view["state"] == "completed"
    assert view["progress"] == {
        "files": 3, "files_completed": 3, "bytes": 5005, "bytes_received": 5005,
        "bytes_completed": 5005,
    }  # fmt: skip
    assert {m["path"]: m["id"] for m in view["members"]} == {
        p: upload_id_of(u) for p, u in urls.items()
    }
    # every member lies in the batch's shard, so its completion counts in the same step
    shard = shard_of(batch_key_of("anonymous", name))
    assert {shard_of(upload_id_of(u)) for u in urls.values()} == {shard}

    [event] = await batch_events(flushed_redis, "anonymous", name)
    assert event["type"] == "batch.completed" and event["files"] == "3"
    assert event["bytes"] == "5005" and event["owner"] == "anonymous"
    members = {m["path"]: m for m in json.loads(event["members"])}
    assert set(members) == set(files)
    for path, data in files.items():
        assert members[path]["id"] == upload_id_of(urls[path])
        assert members[path]["sha256"] == hashlib.sha256(data).hexdigest()
        assert members[path]["length"] == str(len(data))


async def test_a_batch_expecting_files_and_bytes_waits_for_its_empty_files_too(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    """`tusserver upload` opens a folder's batch with both counts; the bytes are all there
    before an empty file has even joined, and that must not complete the batch without it."""
    opened = await open_batch(http, server, {"files": 3, "bytes": 8})
    name = opened["id"]
    await send_file(http, server, b"1234", batch=name, relativePath="a")
    await send_file(http, server, b"5678", batch=name, relativePath="b")

    status, view = await get_batch(http, server, name)
    assert status == 200 and view["state"] == "open"
    assert view["progress"]["bytes_completed"] == 8
    assert await batch_events(flushed_redis, "anonymous", name) == []

    await send_file(http, server, b"", batch=name, relativePath="empty")
    status, view = await get_batch(http, server, name)
    assert view["state"] == "completed"
    [event] = await batch_events(flushed_redis, "anonymous", name)
    assert sorted(m["path"] for m in json.loads(event["members"])) == ["a", "b", "empty"]


async def test_a_batch_named_only_in_metadata_completes_when_sealed_with_what_it_has(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    await send_file(http, server, b"one", batch="implicit-1", relativePath="one.txt")
    status, view = await get_batch(http, server, "implicit-1")
    assert status == 200 and view["state"] == "open" and view["progress"]["files"] == 1
    unfinished = await send_file(
        http, server, b"", batch="implicit-1", relativePath="two.txt", filename="two"
    )
    assert unfinished  # empty: complete at once
    async with http.post(server.url + "batches/implicit-1/seal") as response:
        assert response.status == 200
        sealed = await response.json()
    assert sealed["state"] == "completed"
    [event] = await batch_events(flushed_redis, "anonymous", "implicit-1")
    assert sorted(m["path"] for m in json.loads(event["members"])) == ["one.txt", "two.txt"]

    # sealed: no more files, and sealing again writes no second event
    sent = joining("implicit-1", "x", 1)
    async with http.post(server.url, headers=sent) as response:
        assert response.status == 409
    async with http.post(server.url + "batches/implicit-1/seal") as response:
        assert response.status == 200
    assert len(await batch_events(flushed_redis, "anonymous", "implicit-1")) == 1


async def test_a_sealed_batch_waits_for_a_member_still_uploading(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    opened = await open_batch(http, server, {"files": 5})
    name = opened["id"]
    await send_file(http, server, b"done", batch=name, relativePath="done")
    sent = joining(name, "late", 4)
    async with http.post(server.url, headers=sent) as response:
        late = response.headers["Location"]
    async with http.post(server.url + f"batches/{name}/seal") as response:
        assert (await response.json())["state"] == "sealed"
    assert await batch_events(flushed_redis, "anonymous", name) == []
    assert (await patch(http, late, 0, b"late")).status == 204
    [event] = await batch_events(flushed_redis, "anonymous", name)
    assert event["files"] == "2"


async def test_a_member_that_failed_is_retried_under_the_same_path(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    """A member terminated midway no longer counts; a new upload for its path takes its place,
    and the event names only the new one."""
    opened = await open_batch(http, server, {"files": 2})
    name = opened["id"]
    await send_file(http, server, b"first", batch=name, relativePath="a")
    sent = joining(name, "b", 6)
    async with http.post(server.url, headers=sent) as response:
        failed = response.headers["Location"]
    assert (await patch(http, failed, 0, b"bro")).status == 204
    async with http.delete(failed, headers=TUS) as response:
        assert response.status == 204
    status, view = await get_batch(http, server, name)
    assert status == 200
    assert [m["state"] for m in view["members"]] == ["completed", "gone"]
    retried = await send_file(http, server, b"second", batch=name, relativePath="b")
    [event] = await batch_events(flushed_redis, "anonymous", name)
    members = {m["path"]: m["id"] for m in json.loads(event["members"])}
    assert members["b"] == upload_id_of(retried) != upload_id_of(failed)


async def test_a_completed_member_that_is_deleted_no_longer_counts(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    opened = await open_batch(http, server, {"files": 2})
    name = opened["id"]
    first = await send_file(http, server, b"first", batch=name, relativePath="a")
    async with http.delete(first, headers=TUS) as response:
        assert response.status == 204
    await send_file(http, server, b"b", batch=name, relativePath="b")
    assert await batch_events(flushed_redis, "anonymous", name) == []
    _, view = await get_batch(http, server, name)
    assert view["progress"]["files_completed"] == 1
    await send_file(http, server, b"again", batch=name, relativePath="a")
    [event] = await batch_events(flushed_redis, "anonymous", name)
    assert event["bytes"] == str(len(b"again") + 1)


async def test_a_completed_path_cannot_be_sent_again_and_a_full_batch_takes_no_more(
    server: Server, http: aiohttp.ClientSession
) -> None:
    opened = await open_batch(http, server, {"files": 2, "bytes": 10})
    name = opened["id"]
    await send_file(http, server, b"12345", batch=name, relativePath="a")
    again = joining(name, "a", 1)
    async with http.post(server.url, headers=again) as response:
        assert response.status == 409
        assert "completed upload already" in await response.text()
    too_big = joining(name, "b", 6)
    async with http.post(server.url, headers=too_big) as response:
        assert response.status == 413
    deferred = {
        **TUS, "Upload-Defer-Length": "1", "Upload-Metadata": metadata(batch=name, path="b"),
    }  # fmt: skip
    async with http.post(server.url, headers=deferred) as response:
        assert response.status == 409
        assert "Upload-Length" in await response.text()
    ok = joining(name, "b", 5)
    async with http.post(server.url, headers=ok) as response:
        assert response.status == 201
    third = joining(name, "c", 0)
    async with http.post(server.url, headers=third) as response:
        assert response.status == 409


@pytest.mark.parametrize(
    "path",
    [
        "../etc/passwd", "a/../../b", "/abs/path", "C:/windows", "a//b", "./a", "a/.",
        "back\\slash", "nul\x00byte", "a/" * 40 + "z", "x" * 1025, "tab\there",
    ],
)  # fmt: skip
async def test_unsafe_member_paths_are_refused_and_nothing_is_stored(
    server: Server, http: aiohttp.ClientSession, path: str, flushed_redis: str
) -> None:
    sent = joining("b1", path, 1, key="relativePath")
    async with http.post(server.url, headers=sent) as response:
        assert response.status == 400, path
        assert "path" in await response.text()
    assert (await get_batch(http, server, "b1"))[0] == 404
    async with http.get(server.url, headers=TUS) as response:
        assert (await response.json())["uploads"] == []


@pytest.mark.parametrize("name", ["", "..", "a b", "x" * 129, "ä", "a/b"])
async def test_bad_batch_names_are_refused(
    server: Server, http: aiohttp.ClientSession, name: str
) -> None:
    sent = joining(name, "p", 1)
    async with http.post(server.url, headers=sent) as response:
        assert response.status == 400
    async with http.post(server.url + "batches", json={"name": name}) as response:
        assert response.status == 400


async def test_opening_a_batch_checks_its_json(server: Server, http: aiohttp.ClientSession) -> None:
    for body in ({"files": 0}, {"files": "3"}, {"bytes": -1}, {"other": 1}, {"metadata": [1]}):
        async with http.post(server.url + "batches", json=body) as response:
            assert response.status == 400, body
    async with http.post(
        server.url + "batches", data=b"[1]", headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
    async with http.post(
        server.url + "batches", data=b"x", headers={"Content-Type": "text/plain"}
    ) as response:
        assert response.status == 415
    opened = await open_batch(http, server, {"name": "named"})
    assert opened["id"] == "named" and opened["url"].endswith("/files/batches/named")
    async with http.post(server.url + "batches", json={"name": "named"}) as response:
        assert response.status == 409


async def test_listing_filters_by_batch(server: Server, http: aiohttp.ClientSession) -> None:
    opened = await open_batch(http, server)
    name = opened["id"]
    inside = [
        await send_file(http, server, bytes([i]), batch=name, relativePath=f"f{i}")
        for i in range(3)
    ]
    await send_file(http, server, b"outside", filename="outside")
    async with http.get(server.url, params={"batch": name, "limit": "2"}) as response:
        page = await response.json()
    assert [u["url"] for u in page["uploads"]] == inside[:2]
    assert [u["batch_path"] for u in page["uploads"]] == ["f0", "f1"]
    query = {"batch": name, "cursor": page["next_cursor"]}
    async with http.get(server.url, params=query) as response:
        assert [u["url"] for u in (await response.json())["uploads"]] == inside[2:]
    async with http.get(server.url, params={"batch": "nope"}) as response:
        assert response.status == 404


async def test_deleting_a_batch_terminates_every_member(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    opened = await open_batch(http, server, {"files": 3})
    name = opened["id"]
    done = await send_file(http, server, b"done", batch=name, relativePath="a")
    sent = joining(name, "b", 9)
    async with http.post(server.url, headers=sent) as response:
        running = response.headers["Location"]
    async with http.delete(server.url + f"batches/{name}") as response:
        assert response.status == 204
    for url in (done, running):
        async with http.head(url, headers=TUS) as response:
            assert response.status == 404
        assert not server.file_of(url).exists()
    assert (await get_batch(http, server, name))[0] == 404
    [event] = await batch_events(flushed_redis, "anonymous", name)
    assert event["type"] == "batch.terminated"
    assert sorted(m["path"] for m in json.loads(event["members"])) == ["a", "b"]


async def test_an_unfinished_batch_expires_with_its_members(
    make_server: ServerFactory, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    server = await make_server(expire_after_s=1.0)
    opened = await open_batch(http, server, {"files": 2})
    name = opened["id"]
    done = await send_file(http, server, b"done", batch=name, relativePath="a")
    sent = joining(name, "b", 9)
    async with http.post(server.url, headers=sent) as response:
        stalled = response.headers["Location"]
    uploads = server.uploads
    # before its time nothing goes; at its time (a clock passed in) the stalled member and
    # then the batch, with the completed member too
    created = opened["created"]
    assert await expiry.sweep_once(uploads, now=created + 0.5) == 0
    assert (await get_batch(http, server, name))[0] == 200
    await expiry.sweep_once(uploads, now=created + 60)
    assert (await get_batch(http, server, name))[0] == 404
    for url in (done, stalled):
        async with http.head(url, headers=TUS) as response:
            assert response.status == 404
        assert not server.file_of(url).exists()
    [event] = await batch_events(flushed_redis, "anonymous", name)
    assert event["type"] == "batch.expired"


async def test_a_batch_waits_for_a_member_that_is_still_uploading(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(expire_after_s=30.0)
    opened = await open_batch(http, server, {"files": 2})
    name = opened["id"]
    sent = joining(name, "b", 9)
    async with http.post(server.url, headers=sent) as response:
        member = response.headers["Location"]
    assert (await patch(http, member, 0, b"1234")).status == 204  # active after the join
    _, view = await get_batch(http, server, name)
    async with http.get(server.url, params={"batch": name}) as response:
        [listed] = (await response.json())["uploads"]
    assert listed["expires"] > view["expires"]
    # the batch's own time has come, but its member lives until later: it waits
    await expiry.sweep_once(server.uploads, now=(view["expires"] + listed["expires"]) / 2)
    assert (await get_batch(http, server, name))[0] == 200
    await expiry.sweep_once(server.uploads, now=opened["created"] + 65)
    assert (await get_batch(http, server, name))[0] == 404
    async with http.head(member, headers=TUS) as response:
        assert response.status == 404


async def test_a_token_reaches_only_its_batch_and_its_counts(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=(SECRET,))

    def token(**claims: Any) -> dict[str, str]:
        return bearer(
            issue_token(SECRET, subject="alice", actions=["create", "upload", "read"], ttl_s=60,
                        **claims)
        )  # fmt: skip

    scoped = token(batch="import-7", batch_files=2, batch_bytes=10)
    opened = await open_batch(http, server, {}, **scoped)
    assert opened["id"] == "import-7"  # named by the token
    async with http.post(server.url + "batches", json={"name": "mine"}, headers=scoped) as r:
        assert r.status == 403 and "its own batch" in await r.text()
    await send_file(http, server, b"12345", headers=scoped, batch="import-7", path="a")
    outside = {**TUS, "Upload-Length": "1", "Upload-Metadata": metadata(filename="x"), **scoped}
    async with http.post(server.url, headers=outside) as response:
        assert response.status == 403
    other = joining("other", "x", 1) | scoped
    async with http.post(server.url, headers=other) as response:
        assert response.status == 403
    too_many_bytes = joining("import-7", "b", 6) | scoped
    async with http.post(server.url, headers=too_many_bytes) as response:
        assert response.status == 403
        assert "bytes" in await response.text()
    await send_file(http, server, b"12345", headers=scoped, batch="import-7", path="b")
    third = joining("import-7", "c", 0) | scoped
    async with http.post(server.url, headers=third) as response:
        assert response.status == 403
        assert "files" in await response.text()
    # the token reads its own batch, and no other of the same subject
    assert (await get_batch(http, server, "import-7", **scoped))[0] == 200
    await open_batch(http, server, {"name": "second"}, **token())
    assert (await get_batch(http, server, "second", **scoped))[0] == 404
    # another subject never sees alice's batch of the same name
    bob = bearer(issue_token(SECRET, subject="bob", actions=["read"], ttl_s=60))
    assert (await get_batch(http, server, "import-7", **bob))[0] == 404


def test_members_of_a_batch_get_ids_in_its_shard() -> None:
    from tusserver.store.records import is_upload_id, new_upload_id

    for shard in range(SHARD_COUNT):
        upload_id = new_upload_id(shard)
        assert is_upload_id(upload_id) and shard_of(upload_id) == shard


async def test_every_way_of_creating_an_upload_joins_its_batch(
    server: Server, http: aiohttp.ClientSession, flushed_redis: str
) -> None:
    """A form (its `batch` field; the file names are the paths), a draft creation and a final
    concatenation (not its parts) join the batch as a tus creation does."""
    opened = await open_batch(http, server, {"files": 4})
    name = opened["id"]
    data = aiohttp.FormData()
    data.add_field("batch", name)
    data.add_field("file", b"from a form", filename="form-1.txt")
    data.add_field("file", b"another", filename="form-2.txt")
    async with http.post(server.url, data=data, headers={"Accept": "application/json"}) as r:
        assert r.status == 201, await r.text()
    draft_headers = {
        "Upload-Draft-Interop-Version": "6", "Upload-Complete": "?1",
        "Upload-Metadata": metadata(batch=name, relativePath="draft.bin"),
    }  # fmt: skip
    async with http.post(server.url, data=b"draft body", headers=draft_headers) as r:
        assert r.status == 201, await r.text()
    parts = []
    for piece in (b"con", b"cat"):
        headers = {
            **TUS, "Upload-Length": "3", "Upload-Concat": "partial",
            "Upload-Metadata": metadata(batch=name, relativePath="part"),
        }  # fmt: skip
        async with http.post(server.url, headers=headers) as r:
            parts.append(r.headers["Location"])
        assert (await patch(http, parts[-1], 0, piece)).status == 204
    _, view = await get_batch(http, server, name)
    assert view["progress"]["files"] == 3  # the parts did not join
    final = {
        **TUS, "Upload-Concat": "final;" + " ".join(parts),
        "Upload-Metadata": metadata(batch=name, relativePath="joined.txt"),
    }  # fmt: skip
    async with http.post(server.url, headers=final) as r:
        assert r.status == 201, await r.text()
    [event] = await batch_events(flushed_redis, "anonymous", name)
    members = {m["path"]: m for m in json.loads(event["members"])}
    assert set(members) == {"form-1.txt", "form-2.txt", "draft.bin", "joined.txt"}
    assert members["joined.txt"]["sha256"] == hashlib.sha256(b"concat").hexdigest()
    assert members["draft.bin"]["sha256"] == hashlib.sha256(b"draft body").hexdigest()


async def test_options_on_the_batch_routes_needs_no_token(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(secrets=(SECRET,))
    for path, allowed in (
        ("batches", "OPTIONS, POST"),
        ("batches/b-1", "OPTIONS, GET, HEAD, DELETE"),
        ("batches/b-1/seal", "OPTIONS, POST"),
    ):
        async with http.options(server.url + path) as response:
            assert response.status == 204 and response.headers["Allow"] == allowed
        async with http.get(server.url + path) as response:
            assert response.status == 401  # everything else needs a token
        token = bearer(issue_token(SECRET, subject="a", actions=["read"], ttl_s=60))
        async with http.put(server.url + path, headers=token) as response:
            assert response.status == 405
            assert response.headers["Allow"] == allowed
