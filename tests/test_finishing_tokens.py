"""Tokens that let an upload finish (the `fin` claim, docs/tokens.md): the token that created
an upload keeps working after its `exp` for HEAD, PATCH and DELETE of that one upload until it
completes or expires, and for nothing else; without the claim nothing changes.

Each test issues a token that dies a few seconds after it starts (its `exp` plus the server's
leeway just ahead), uses it while it is valid, then waits until the clock has passed it: the
server's own clock decides, as in production.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable

import aiohttp
import pytest

from tests.support.mobile import java_patch
from tests.support.servers import Server, ServerFactory
from tests.support.tus import (
    TUS,
    bearer,
    create_upload,
    head_offset,
    patch,
    upload_id_of,
)
from tests.support.waiting import wait_until
from tusserver.auth import ACTIONS, DEFAULT_LEEWAY_S, issue_token
from tusserver.store.records import keys_of
from tusserver.uploads import expiry

SECRET = "finishing-secret"
TTL_S = 60


def dying_token(
    valid_for_s: float, *, finishes: bool = True, actions: Iterable[str] = ACTIONS
) -> tuple[str, float]:
    """A token for alice that the server refuses (as a plain token) from about `valid_for_s`
    seconds on; it and the unix time it dies at (its `exp` plus the leeway)."""
    issued_at = time.time() - TTL_S - DEFAULT_LEEWAY_S + valid_for_s
    made = issue_token(SECRET, subject="alice", actions=actions, ttl_s=TTL_S,
                       finishes=finishes, now=issued_at)  # fmt: skip
    return made, math.ceil(issued_at + TTL_S) + DEFAULT_LEEWAY_S  # exp as issue_token sets it


def fresh_token(subject: str = "alice") -> str:
    return issue_token(SECRET, subject=subject, actions=ACTIONS, ttl_s=600)


async def died(dies_at: float) -> None:
    """Wait until the server's clock (this machine's) is past `dies_at`."""
    await wait_until(lambda: time.time() > dies_at + 0.05, timeout_s=dies_at - time.time() + 5,
                     what="the token's exp plus the leeway passed")  # fmt: skip


@pytest.fixture
async def secured(make_server: ServerFactory) -> Server:
    return await make_server(secrets=(SECRET,))


async def status_of(
    http: aiohttp.ClientSession, method: str, url: str, token: str, **headers: str
) -> tuple[int, str]:
    async with http.request(method, url, headers={**TUS, **bearer(token), **headers}) as answer:
        return answer.status, await answer.text()


async def test_expired_fin_token_finishes_its_own_upload_and_nothing_else(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    token, dies_at = dying_token(4.0)
    own = await create_upload(http, secured.url, 6, **bearer(token))
    also_own = await create_upload(http, secured.url, 6, **bearer(token))
    left_to_expire = await create_upload(http, secured.url, 6, **bearer(token))
    assert (await patch(http, own, 0, b"ab", **bearer(token))).status == 204
    others = await create_upload(http, secured.url, 6, **bearer(fresh_token()))
    await died(dies_at)

    # its own upload: HEAD, PATCH go on (the offset is the committed one)
    assert await head_offset(http, own, **bearer(token)) == 2
    assert (await patch(http, own, 2, b"cd", **bearer(token))).status == 204
    # nothing else of the same subject, no creation, no listing
    assert await status_of(http, "HEAD", others, token) == (401, "")
    answer = await patch(http, others, 0, b"xy", **bearer(token))
    assert answer.status == 401
    assert await head_offset(http, others, **bearer(fresh_token())) == 0
    assert await status_of(http, "POST", secured.url, token, **{"Upload-Length": "3"}) == (
        401, "token expired\n",
    )  # fmt: skip
    assert (await status_of(http, "GET", secured.url, token))[0] == 401
    # DELETE of its own, then nothing more of it
    assert (await status_of(http, "DELETE", also_own, token))[0] == 204
    assert await status_of(http, "HEAD", also_own, token) == (401, "")
    assert (await status_of(http, "DELETE", also_own, token))[0] == 401
    # the last bytes complete it; from then on the token is expired for it too
    assert (await patch(http, own, 4, b"ef", **bearer(token))).status == 204
    assert await status_of(http, "HEAD", own, token) == (401, "")
    assert (await status_of(http, "GET", own, token))[0] == 401
    assert (await patch(http, own, 6, b"", **bearer(token))).status == 401
    async with http.get(own, headers=bearer(fresh_token())) as response:
        assert await response.read() == b"abcdef"
    # an upload that expired (the sweeper removed it) is refused as well
    assert await expiry.sweep_once(secured.uploads, now=time.time() + 2 * 24 * 3600) >= 1
    assert await status_of(http, "HEAD", left_to_expire, token) == (401, "")


async def test_the_upload_records_a_digest_of_the_token_never_the_token(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    token, _ = dying_token(60.0)
    url = await create_upload(http, secured.url, 6, **bearer(token))
    plain = await create_upload(http, secured.url, 6, **bearer(fresh_token()))
    redis = secured.uploads.state.redis
    record = await redis.hgetall(keys_of(upload_id_of(url), "upload")[0])
    assert record[b"creator"] == hashlib.sha256(token.encode()).hexdigest().encode()
    for value in record.values():
        assert token.encode() not in value and token.split(".")[1].encode() not in value
    assert b"creator" not in await redis.hgetall(keys_of(upload_id_of(plain), "upload")[0])


async def test_without_the_claim_an_expired_token_is_refused_for_its_own_upload(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    token, dies_at = dying_token(3.0, finishes=False)
    url = await create_upload(http, secured.url, 6, **bearer(token))
    assert (await patch(http, url, 0, b"ab", **bearer(token))).status == 204
    await died(dies_at)
    assert await status_of(http, "HEAD", url, token) == (401, "")
    answer = await patch(http, url, 2, b"cd", **bearer(token))
    assert answer.status == 401
    assert (await status_of(http, "DELETE", url, token))[0] == 401
    assert await head_offset(http, url, **bearer(fresh_token())) == 2


async def test_expired_fin_token_keeps_its_scope_actions_and_subject(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    secured = await make_server(secrets=(SECRET,))
    token, dies_at = dying_token(3.0, actions=["create", "upload"])
    url = await create_upload(http, secured.url, 6, **bearer(token))
    await died(dies_at)
    status, reason = await status_of(http, "DELETE", url, token)
    assert (status, "delete" in reason) == (403, True)  # no `delete` in its act
    assert await head_offset(http, url, **bearer(token)) == 0
    rotated = await make_server(secrets=("new-secret",))  # same Redis: a rotated-out secret
    assert await status_of(http, "HEAD", rotated.url + upload_id_of(url), token) == (401, "")


@pytest.mark.parametrize("override", [True, False], ids=["post-override", "patch"])
async def test_java_client_whose_token_expires_mid_upload_finishes_it(
    secured: Server, http: aiohttp.ClientSession, override: bool
) -> None:
    """tus-java-client sends the token it was given at the start with every request
    (TusClient.setHeaders / prepareConnection); its PATCHes are chunked, with no
    Content-Length, with `Expect: 100-continue`, as POST + override on stock Java."""
    token, dies_at = dying_token(4.0)
    data = bytes(range(256)) * 4096  # 1 MiB
    url = await create_upload(http, secured.url, len(data), **bearer(token))
    first = await java_patch(url, 0, data[: 400 * 1024], bearer(token), override=override)
    assert first is not None and first.continued and first.response.status == 204
    other = await create_upload(http, secured.url, len(data), **bearer(fresh_token()))
    await died(dies_at)

    # refused before its body: no 100 Continue, nothing written
    refused = await java_patch(other, 0, data, bearer(token), override=override)
    assert refused is not None and not refused.continued
    assert (refused.response.status, refused.response.body) == (401, b"token expired\n")
    assert await head_offset(http, other, **bearer(fresh_token())) == 0
    # its own upload goes on to the end
    rest = await java_patch(url, 400 * 1024, data[400 * 1024 :], bearer(token), override=override)
    assert rest is not None and rest.continued
    assert rest.response.status == 204
    assert rest.response.headers["upload-offset"] == str(len(data))
    async with http.get(url, headers=bearer(fresh_token())) as response:
        assert await response.read() == data
    again = await java_patch(url, len(data), b"x", bearer(token), override=override)
    assert again is not None and not again.continued and again.response.status == 401


async def test_expired_fin_token_finishes_its_own_upload_over_the_draft(
    secured: Server, http: aiohttp.ClientSession
) -> None:
    """iOS URLSession resumes with the resumable-upload draft (interop 6 here): its HEAD and
    its completing append are let through for the token's own upload too."""
    token, dies_at = dying_token(4.0)
    own = await create_upload(http, secured.url, 6, **bearer(token))
    assert (await patch(http, own, 0, b"ab", **bearer(token))).status == 204
    others = await create_upload(http, secured.url, 6, **bearer(fresh_token()))
    await died(dies_at)
    draft = {"Upload-Draft-Interop-Version": "6", **bearer(token)}
    async with http.head(own, headers=draft) as response:
        assert response.status in (200, 204)
        assert response.headers["Upload-Offset"] == "2"
    appended = {**draft, "Upload-Offset": "2", "Upload-Complete": "?1",
                "Content-Type": "application/partial-upload"}  # fmt: skip
    async with http.patch(own, data=b"cdef", headers=appended) as response:
        assert response.status in (200, 204), await response.text()
        assert response.headers["Upload-Complete"] == "?1"
    async with http.head(others, headers=draft) as response:
        assert response.status == 401
    async with http.get(own, headers=bearer(fresh_token())) as response:
        assert await response.read() == b"abcdef"
