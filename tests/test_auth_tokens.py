"""Signed tokens: issuing, verifying, scoping, and reading them from a request."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pytest
from itsdangerous import URLSafeSerializer

from tusserver.auth import (
    ACTIONS,
    ACTIONS_FOR_METHOD,
    ANONYMOUS,
    DEFAULT_LEEWAY_S,
    TOKEN_SALT,
    Grant,
    grant_for_request,
    issue_token,
    token_from_request,
    verify_token,
)
from tusserver.errors import Forbidden, PayloadTooLarge, TusError, Unauthorized, UploadNotFound
from tusserver.uploads.body import SizeLimit

SECRET = "test-secret-0123456789abcdef"
NOW = 1_700_000_000.0

# The test vector of docs/tokens.md; a parent in any language can check its code against it.
VECTOR_SECRET = "docs-example-secret-do-not-use"
VECTOR_NOW = 1700000000
VECTOR_PAYLOAD = (
    '{"sub":"user-42","act":["create","upload"],"iat":1700000000,"exp":1700003600,'
    '"max":10000000000,"md":{"filetype":["image/png","image/jpeg"]}}'
)
VECTOR_TOKEN = (
    "eyJzdWIiOiJ1c2VyLTQyIiwiYWN0IjpbImNyZWF0ZSIsInVwbG9hZCJdLCJpYXQiOjE3MDAwMDAwMDAsImV4cCI6"
    "MTcwMDAwMzYwMCwibWF4IjoxMDAwMDAwMDAwMCwibWQiOnsiZmlsZXR5cGUiOlsiaW1hZ2UvcG5nIiwiaW1hZ2Uv"
    "anBlZyJdfX0.YNaLZGiKQ77ztzu_35BiJ6IuUXg"
)
# The second vector: a token that may finish what it starts (the `fin` claim).
FIN_VECTOR_PAYLOAD = (
    '{"sub":"user-42","act":["create","upload","delete"],"iat":1700000000,"exp":1700000900,'
    '"fin":true}'
)
FIN_VECTOR_TOKEN = (
    "eyJzdWIiOiJ1c2VyLTQyIiwiYWN0IjpbImNyZWF0ZSIsInVwbG9hZCIsImRlbGV0ZSJdLCJpYXQiOjE3MDAwMDAw"
    "MDAsImV4cCI6MTcwMDAwMDkwMCwiZmluIjp0cnVlfQ.CMgllv8uEKQy50uz2HHi5uaE1sQ"
)
DOCS = Path(__file__).resolve().parent.parent / "docs" / "tokens.md"


def token(
    *,
    secret: str = SECRET,
    subject: str = "alice",
    actions: Iterable[str] = ACTIONS,
    ttl_s: float = 3600,
    now: float = NOW,
    max_size_bytes: int | None = None,
    upload_id: str | None = None,
    metadata: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """A token signed with SECRET at NOW for one hour, for subject alice, all actions."""
    return issue_token(
        secret,
        subject=subject,
        actions=actions,
        ttl_s=ttl_s,
        now=now,
        max_size_bytes=max_size_bytes,
        upload_id=upload_id,
        metadata=metadata,
    )


def signed(payload: object, secret: str = SECRET) -> str:
    """Any payload, signed the way a parent using stock itsdangerous would sign it."""
    return URLSafeSerializer(secret, salt=TOKEN_SALT).dumps(payload)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def independent_signature(payload_part: str, secret: str) -> str:
    """HMAC-SHA1 keyed with SHA1(salt + "signer" + secret), written without itsdangerous."""
    # SHA-1 is itsdangerous's default; inside HMAC it is not the weak spot it is for hashing
    key = hashlib.sha1(TOKEN_SALT.encode() + b"signer" + secret.encode()).digest()  # noqa: S324
    return b64url(hmac.new(key, payload_part.encode("ascii"), hashlib.sha1).digest())


def refused(error: pytest.ExceptionInfo[TusError], kind: type[TusError], status: int) -> str:
    """Assert the error's class and status; return its reason."""
    assert type(error.value) is kind
    assert error.value.status == status
    return error.value.reason


# --- issue and verify -------------------------------------------------------------------


def test_round_trip_keeps_every_field() -> None:
    issued = token(
        subject="user-7",
        actions=["upload", "create"],
        max_size_bytes=1000,
        upload_id="abc123",
        metadata={"filetype": ["image/png", "image/jpeg"]},
    )
    grant = verify_token(issued, [SECRET], now=NOW + 10)
    assert grant == Grant(
        subject="user-7",
        actions=frozenset({"create", "upload"}),
        max_size_bytes=1000,
        upload_id="abc123",
        metadata={"filetype": ("image/png", "image/jpeg")},
        expires_at=NOW + 3600,
    )


def test_issued_tokens_are_plain_base64url_json_never_compressed() -> None:
    issued = token(metadata={"filetype": ["image/png"] * 40})
    payload_part, _ = issued.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload_part + "=" * (-len(payload_part) % 4)))
    assert decoded["md"] == {"filetype": ["image/png"] * 40}


def test_forged_signature_is_401_bad_signature() -> None:
    payload_part, _ = token().split(".")
    with pytest.raises(Unauthorized) as error:
        verify_token(f"{payload_part}.{'A' * 27}", [SECRET], now=NOW)
    assert refused(error, Unauthorized, 401) == "bad signature"
    assert error.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_token_signed_with_an_unknown_secret_is_401_bad_signature() -> None:
    with pytest.raises(Unauthorized) as error:
        verify_token(token(secret="some-other-secret"), [SECRET], now=NOW)
    assert refused(error, Unauthorized, 401) == "bad signature"


def test_tampered_payload_is_401_bad_signature() -> None:
    payload_part, signature = token(actions=["read"]).split(".")
    flipped = payload_part[:10] + ("A" if payload_part[10] != "A" else "B") + payload_part[11:]
    with pytest.raises(Unauthorized) as error:
        verify_token(f"{flipped}.{signature}", [SECRET], now=NOW)
    assert refused(error, Unauthorized, 401) == "bad signature"
    # a rewritten payload that grants more, with the old signature, fails the same way
    greedy = json.loads(base64.urlsafe_b64decode(payload_part + "=" * (-len(payload_part) % 4)))
    greedy["act"] = sorted(ACTIONS)
    rewritten = b64url(json.dumps(greedy, separators=(",", ":")).encode())
    with pytest.raises(Unauthorized) as error:
        verify_token(f"{rewritten}.{signature}", [SECRET], now=NOW)
    assert refused(error, Unauthorized, 401) == "bad signature"


def test_expired_token_is_401() -> None:
    issued = token(ttl_s=60, now=NOW - 3600)
    with pytest.raises(Unauthorized) as error:
        verify_token(issued, [SECRET], now=NOW)
    assert refused(error, Unauthorized, 401) == "token expired"


def test_exp_just_past_is_accepted_within_the_leeway_and_refused_beyond() -> None:
    issued = token(ttl_s=60, now=NOW - 60)  # exp == NOW
    assert verify_token(issued, [SECRET], now=NOW + DEFAULT_LEEWAY_S - 1).subject == "alice"
    with pytest.raises(Unauthorized) as error:
        verify_token(issued, [SECRET], now=NOW + DEFAULT_LEEWAY_S + 1)
    assert refused(error, Unauthorized, 401) == "token expired"
    with pytest.raises(Unauthorized) as error:
        verify_token(issued, [SECRET], now=NOW + 1, leeway_s=0)
    assert refused(error, Unauthorized, 401) == "token expired"


def test_token_from_a_fast_parent_clock_is_accepted_within_the_leeway() -> None:
    issued = token(now=NOW + DEFAULT_LEEWAY_S - 5)  # iat in our future
    assert verify_token(issued, [SECRET], now=NOW).subject == "alice"


def test_token_issued_beyond_the_leeway_in_the_future_is_401() -> None:
    issued = token(now=NOW + DEFAULT_LEEWAY_S + 60)
    with pytest.raises(Unauthorized) as error:
        verify_token(issued, [SECRET], now=NOW)
    assert refused(error, Unauthorized, 401).startswith("token issued in the future")


def test_rotation_old_secret_works_while_configured_and_fails_once_removed() -> None:
    old, new = "old-secret", "new-secret"
    from_old = token(secret=old)
    assert verify_token(from_old, [new, old], now=NOW).subject == "alice"
    assert verify_token(token(secret=new), [new, old], now=NOW).subject == "alice"
    with pytest.raises(Unauthorized) as error:
        verify_token(from_old, [new], now=NOW)
    assert refused(error, Unauthorized, 401) == "bad signature"


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "abc.def", "a.b.c.d", "é" * 40 + "." + "A" * 27, "A" * 9000 + "." + "A" * 27],
)
def test_malformed_token_is_401(bad: str) -> None:
    with pytest.raises(Unauthorized) as error:
        verify_token(bad, [SECRET], now=NOW)
    assert refused(error, Unauthorized, 401) == "malformed token"


@pytest.mark.parametrize(
    "payload",
    [
        ["not", "an", "object"],
        {"act": ["read"], "exp": 1_700_003_600},
        {"sub": "", "act": ["read"], "exp": 1_700_003_600},
        {"sub": "a", "act": ["read"]},
        {"sub": "a", "act": ["read"], "exp": "1700003600"},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600.5},
        {"sub": "a", "act": ["read"], "exp": True},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "iat": "yesterday"},
        {"sub": "a", "act": [], "exp": 1_700_003_600},
        {"sub": "a", "act": "read", "exp": 1_700_003_600},
        {"sub": "a", "act": ["read", "admin"], "exp": 1_700_003_600},
        {"sub": "a", "act": [["read"]], "exp": 1_700_003_600},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "max": -1},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "max": "1GB"},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "uid": 7},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "md": {"filetype": "image/png"}},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "md": [["filetype"]]},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "batch": ""},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "batch": 7},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "batch_files": 0},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "batch_files": "9"},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "batch_bytes": True},
        {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "batch_bytes": 2.5},
    ],
)
def test_signed_but_invalid_payload_is_401(payload: object) -> None:
    with pytest.raises(Unauthorized) as error:
        verify_token(signed(payload), [SECRET], now=NOW)
    assert refused(error, Unauthorized, 401).startswith("token payload is invalid")


def test_signed_payload_that_is_not_json_is_401_invalid_payload() -> None:
    payload_part = b64url(b"not json at all")
    forged = f"{payload_part}.{independent_signature(payload_part, SECRET)}"
    with pytest.raises(Unauthorized) as error:
        verify_token(forged, [SECRET], now=NOW)
    assert refused(error, Unauthorized, 401).startswith("token payload is invalid")


def test_null_optional_fields_and_unknown_fields_are_accepted() -> None:
    payload = {"sub": "a", "act": ["read"], "exp": 1_700_003_600, "max": None, "md": None}
    grant = verify_token(signed({**payload, "future_field": 1}), [SECRET], now=NOW)
    assert grant == Grant("a", frozenset({"read"}), expires_at=1_700_003_600.0)


@pytest.mark.parametrize(
    "bad_call",
    [
        lambda: token(secret=""),
        lambda: token(subject=""),
        lambda: token(actions=[]),
        lambda: token(actions=["read", "admin"]),
        lambda: token(ttl_s=0),
        lambda: token(ttl_s=-5),
        lambda: token(ttl_s=float("nan")),
        lambda: token(max_size_bytes=-1),
        lambda: token(upload_id=""),
        lambda: token(metadata={"filetype": "image/png"}),
    ],
)
def test_issue_token_refuses_bad_arguments(bad_call: Callable[[], str]) -> None:
    with pytest.raises(ValueError):
        bad_call()


def test_verify_token_needs_a_secret() -> None:
    with pytest.raises(ValueError):
        verify_token(token(), [], now=NOW)


# --- what a grant allows ------------------------------------------------------------------


def test_missing_action_is_403_naming_it() -> None:
    grant = verify_token(token(actions=["read"]), [SECRET], now=NOW)
    grant.require("read")
    grant.require(*ACTIONS_FOR_METHOD["HEAD"])
    with pytest.raises(Forbidden) as error:
        grant.require(*ACTIONS_FOR_METHOD["PATCH"])
    assert "upload" in refused(error, Forbidden, 403)
    with pytest.raises(Forbidden) as error:
        grant.require("delete")
    assert "delete" in refused(error, Forbidden, 403)


def test_other_upload_id_is_404() -> None:
    grant = verify_token(token(upload_id="mine"), [SECRET], now=NOW)
    grant.check_upload("mine")
    with pytest.raises(UploadNotFound) as error:
        grant.check_upload("theirs")
    refused(error, UploadNotFound, 404)
    verify_token(token(), [SECRET], now=NOW).check_upload("anything")


def test_the_size_limit_is_the_smaller_of_the_servers_and_the_tokens() -> None:
    grant = verify_token(token(max_size_bytes=1000), [SECRET], now=NOW)
    limit = SizeLimit.of(server_max=5000, token_max=grant.max_size_bytes)
    limit.check(1000)
    limit.check(None)  # deferred length: checked later, once known
    with pytest.raises(PayloadTooLarge) as error:
        limit.check(1001)
    assert "this token's maximum of 1000" in refused(error, PayloadTooLarge, 413)
    with pytest.raises(PayloadTooLarge) as error:
        SizeLimit.of(server_max=500, token_max=1000).check(501)
    assert "this server's maximum of 500" in refused(error, PayloadTooLarge, 413)
    unlimited = verify_token(token(), [SECRET], now=NOW).max_size_bytes
    SizeLimit.of(server_max=None, token_max=unlimited).check(10**15)


def test_metadata_constraints() -> None:
    issued = token(metadata={"filetype": ["image/png", "image/jpeg"]})
    grant = verify_token(issued, [SECRET], now=NOW)
    grant.check_metadata({"filetype": b"image/png", "filename": b"cat.png"})
    grant.check_metadata({"filetype": b"image/jpeg"})
    for metadata in (
        {"filetype": b"application/x-sh"},
        {"filename": b"cat.png"},
        {"filetype": None},
        {"filetype": b"\xff\xfe"},
        {},
    ):
        with pytest.raises(Forbidden) as error:
            grant.check_metadata(metadata)
        assert "filetype" in refused(error, Forbidden, 403)
    ANONYMOUS.check_metadata({})


# --- tokens in requests ---------------------------------------------------------------------


def test_bearer_header_is_read_with_any_case() -> None:
    assert token_from_request("PATCH", {"Authorization": "Bearer abc.def"}, {}) == "abc.def"
    assert token_from_request("PATCH", {"authorization": "bearer  abc.def "}, {}) == "abc.def"
    assert token_from_request("POST", {}, {}) is None


@pytest.mark.parametrize("value", ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer a b"])
def test_malformed_authorization_header_is_401(value: str) -> None:
    with pytest.raises(Unauthorized) as error:
        token_from_request("GET", {"Authorization": value}, {})
    assert refused(error, Unauthorized, 401) == "malformed Authorization header"


@pytest.mark.parametrize("method", ["PATCH", "POST", "DELETE", "OPTIONS"])
def test_query_token_on_other_methods_is_401(method: str) -> None:
    with pytest.raises(Unauthorized) as error:
        token_from_request(method, {}, {"token": token()})
    assert "only accepted on GET and HEAD" in refused(error, Unauthorized, 401)


@pytest.mark.parametrize("method", ["GET", "HEAD", "get"])
def test_query_token_on_get_and_head_is_accepted(method: str) -> None:
    issued = token(actions=["read"])
    assert token_from_request(method, {}, {"token": issued}) == issued
    grant = grant_for_request(method, {}, {"token": issued}, [SECRET], now=NOW)
    grant.require(*ACTIONS_FOR_METHOD[method.upper()])


def test_header_wins_over_query_token() -> None:
    headers = {"Authorization": "Bearer from-header"}
    assert token_from_request("GET", headers, {"token": "from-query"}) == "from-header"


def test_grant_for_request_in_development_mode_is_anonymous() -> None:
    assert grant_for_request("PATCH", {}, {}, []) is ANONYMOUS
    assert ANONYMOUS.subject == "anonymous"
    assert ANONYMOUS.actions == ACTIONS
    assert ANONYMOUS.max_size_bytes is None and ANONYMOUS.upload_id is None


def test_grant_for_request_without_token_is_401() -> None:
    with pytest.raises(Unauthorized) as error:
        grant_for_request("POST", {}, {}, [SECRET], now=NOW)
    reason = refused(error, Unauthorized, 401)
    assert reason == "a token is required: send Authorization: Bearer <token>"


def test_grant_for_request_verifies_the_bearer_token() -> None:
    headers = {"Authorization": f"Bearer {token(subject='bob')}"}
    assert grant_for_request("PATCH", headers, {}, [SECRET], now=NOW).subject == "bob"
    with pytest.raises(Unauthorized) as error:
        grant_for_request("PATCH", headers, {}, [SECRET], now=NOW + 7200)
    assert refused(error, Unauthorized, 401) == "token expired"


def test_actions_for_method() -> None:
    assert dict(ACTIONS_FOR_METHOD) == {
        "POST": ("create",),
        "PATCH": ("upload",),
        "HEAD": ("upload", "read"),
        "GET": ("read",),
        "DELETE": ("delete",),
    }


# --- the documented format ------------------------------------------------------------------


def test_docs_test_vector_is_reproduced_exactly() -> None:
    issued = issue_token(
        VECTOR_SECRET,
        subject="user-42",
        actions=["create", "upload"],
        ttl_s=3600,
        max_size_bytes=10_000_000_000,
        metadata={"filetype": ["image/png", "image/jpeg"]},
        now=VECTOR_NOW,
    )
    assert issued == VECTOR_TOKEN
    payload_part, _ = issued.split(".")
    assert base64.urlsafe_b64decode(payload_part + "==").decode() == VECTOR_PAYLOAD
    docs = DOCS.read_text(encoding="utf-8")
    for documented in (VECTOR_SECRET, str(VECTOR_NOW), VECTOR_PAYLOAD, VECTOR_TOKEN, TOKEN_SALT):
        assert documented in docs


def test_independent_hmac_implementation_matches_issue_token() -> None:
    payload_part = b64url(VECTOR_PAYLOAD.encode("utf-8"))
    rebuilt = f"{payload_part}.{independent_signature(payload_part, VECTOR_SECRET)}"
    assert rebuilt == VECTOR_TOKEN
    non_ascii = issue_token(SECRET, subject="zoë", actions=["read"], ttl_s=60, now=NOW)
    payload_part, signature = non_ascii.split(".")
    assert signature == independent_signature(payload_part, SECRET)


def test_hand_made_tokens_in_any_key_order_or_compressed_are_accepted() -> None:
    body = b'{ "exp": 1700003600, "act": ["read"], "sub": "parent-in-go" }'
    for payload_part in (b64url(body), "." + b64url(zlib.compress(body))):
        hand_made = f"{payload_part}.{independent_signature(payload_part, SECRET)}"
        assert verify_token(hand_made, [SECRET], now=NOW).subject == "parent-in-go"


def test_docs_node_example_issues_the_test_vector() -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("TUS_TEST_REQUIRE_ALL") == "1":
            pytest.fail("node is required (TUS_TEST_REQUIRE_ALL=1)")
        pytest.skip("node is not installed")
    blocks = re.findall(r"```js\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    example = next(block for block in blocks if "function issueToken" in block)
    result = subprocess.run(
        [node, "-e", example], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.split() == [VECTOR_TOKEN, FIN_VECTOR_TOKEN]


# --- the `fin` claim: tokens that let an upload finish ---------------------------------------


def test_docs_fin_test_vector_is_reproduced_exactly() -> None:
    issued = issue_token(
        VECTOR_SECRET,
        subject="user-42",
        actions=["create", "upload", "delete"],
        ttl_s=900,
        finishes=True,
        now=VECTOR_NOW,
    )
    assert issued == FIN_VECTOR_TOKEN
    payload_part, _ = issued.split(".")
    assert base64.urlsafe_b64decode(payload_part + "==").decode() == FIN_VECTOR_PAYLOAD
    docs = DOCS.read_text(encoding="utf-8")
    assert FIN_VECTOR_PAYLOAD in docs and FIN_VECTOR_TOKEN in docs


def test_fin_claim_is_read_and_the_grant_carries_the_tokens_digest_not_the_token() -> None:
    issued = issue_token(SECRET, subject="alice", actions=["create"], ttl_s=60, finishes=True,
                         now=NOW)  # fmt: skip
    grant = verify_token(issued, [SECRET], now=NOW)
    assert grant.finishes and not grant.expired and grant.finishing is None
    assert grant.created_by == hashlib.sha256(issued.encode()).hexdigest()
    assert issued not in repr(grant)
    plain = verify_token(token(), [SECRET], now=NOW)
    assert not plain.finishes and plain.created_by == ""  # nothing recorded without the claim


def test_expired_fin_token_is_an_expired_grant_only_where_it_may_finish() -> None:
    issued = issue_token(SECRET, subject="alice", actions=["upload"], ttl_s=60, finishes=True,
                         now=NOW - 3600)  # fmt: skip
    grant = verify_token(issued, [SECRET], now=NOW, allow_finishing=True)
    assert grant.expired and grant.finishing == hashlib.sha256(issued.encode()).hexdigest()
    with pytest.raises(Unauthorized) as error:
        verify_token(issued, [SECRET], now=NOW)  # not asked to allow finishing
    assert refused(error, Unauthorized, 401) == "token expired"
    headers = {"Authorization": f"Bearer {issued}"}
    for method in ("HEAD", "PATCH", "DELETE"):
        found = grant_for_request(method, headers, {}, [SECRET], now=NOW, may_finish=True)
        assert found.expired
    for method in ("POST", "GET"):
        with pytest.raises(Unauthorized, match="token expired"):
            grant_for_request(method, headers, {}, [SECRET], now=NOW, may_finish=True)
    with pytest.raises(Unauthorized, match="token expired"):
        grant_for_request("PATCH", headers, {}, [SECRET], now=NOW)  # not about one upload


def test_expired_token_without_fin_is_refused_even_where_one_may_finish() -> None:
    headers = {"Authorization": f"Bearer {token(ttl_s=60, now=NOW - 3600)}"}
    with pytest.raises(Unauthorized, match="token expired"):
        grant_for_request("PATCH", headers, {}, [SECRET], now=NOW, may_finish=True)


def test_expired_fin_token_still_needs_its_signature_and_a_sane_iat() -> None:
    issued = issue_token(SECRET, subject="alice", actions=["upload"], ttl_s=60, finishes=True,
                         now=NOW - 3600)  # fmt: skip
    with pytest.raises(Unauthorized, match="bad signature"):
        verify_token(issued, ["another secret"], now=NOW, allow_finishing=True)
    _payload_part, signature = issued.split(".")
    forged = b64url(
        json.dumps({"sub": "mallory", "act": ["upload"], "exp": 1, "fin": True}).encode()
    )
    with pytest.raises(Unauthorized, match="bad signature"):
        verify_token(f"{forged}.{signature}", [SECRET], now=NOW, allow_finishing=True)
    from_the_future = issue_token(SECRET, subject="alice", actions=["upload"], ttl_s=60,
                                  finishes=True, now=NOW + 3600)  # fmt: skip
    with pytest.raises(Unauthorized, match="issued in the future"):
        verify_token(from_the_future, [SECRET], now=NOW, allow_finishing=True)


@pytest.mark.parametrize("value", ["yes", 1, [], {}])
def test_fin_claim_that_is_not_a_boolean_is_invalid(value: object) -> None:
    body = json.dumps({"sub": "alice", "act": ["create"], "exp": int(NOW) + 60, "fin": value})
    payload_part = b64url(body.encode())
    made = f"{payload_part}.{independent_signature(payload_part, SECRET)}"
    with pytest.raises(Unauthorized, match="fin must be true or false"):
        verify_token(made, [SECRET], now=NOW)


def test_batch_claims_are_read_into_the_grants_quota() -> None:
    issued = issue_token(
        SECRET, subject="a", actions=["create"], ttl_s=60, batch="b-1", batch_files=3,
        batch_bytes=1024, now=NOW,
    )  # fmt: skip
    quota = verify_token(issued, [SECRET], now=NOW).batch_quota
    assert (quota.name, quota.max_files, quota.max_bytes) == ("b-1", 3, 1024)
    unbound = verify_token(token(), [SECRET], now=NOW).batch_quota
    assert (unbound.name, unbound.max_files, unbound.max_bytes) == (None, None, None)
    with pytest.raises(ValueError):
        issue_token(SECRET, subject="a", actions=["create"], ttl_s=60, batch_files=0)
