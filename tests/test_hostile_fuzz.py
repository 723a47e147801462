"""Issue 18: a bounded fuzz of mutated tus requests against one real tusserver process.

A fixed seed makes a few thousand requests from valid ones (creation with and without a body,
PATCH, HEAD, GET, listing, DELETE, OPTIONS, concatenation) by mutating what an outsider
controls: the method and its override, the path (`..`, encodings, long ids, other routes),
the headers (dropped, sent twice, conflicting, huge, non-ASCII bytes, odd numbers, bad names,
other line ends), tokens, the Host, the body and how it is framed (Content-Length too short
or too long, none, chunked right and wrong, chunked with Content-Length, odd
Transfer-Encodings), the HTTP version, and a request cut off anywhere. Each goes on its own
plain socket, sixteen at a time.

It fails on any 5xx, on a request neither answered nor closed in time (and says whether
/health still answers), on a process that died, on a traceback in the server's log, and on
a file written anywhere but the data directory's uploads/ and redis/ folders. The server runs
with short header and body timeouts, so requests mutated into unfinished ones are answered
(408, 400) well inside the per-request deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
import pytest
from itsdangerous import URLSafeSerializer, base64_encode

from tests.support.processes import ServerProcess, tusserver_process
from tests.support.raw_http import RawRequest, exchange, request_bytes
from tests.support.tus import OFFSET_STREAM, bearer, create_upload, patch, upload_id_of
from tusserver.auth import TOKEN_SALT, issue_token

SEED = 18_2026  # a failure names the request's index: the same seed makes the same requests
REQUESTS = 4000
CONCURRENCY = 16
DEADLINE_S = 10.0  # per request; the server's own timeouts are 0.5 s
SECRET = "fuzz-secret"
T = TypeVar("T")
Header = tuple[bytes, bytes]


@pytest.fixture(scope="module")
def fuzzed_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from tusserver_process(
        tmp_path_factory.mktemp("fuzz") / "data",
        "--secret", SECRET, "--header-timeout", "0.5s", "--idle-timeout", "0.5s",
        "--max-size", "1MiB", "--max-concat-parts", "4",
    )  # fmt: skip


# -- what the requests name: real uploads in each state, and tokens -------------------------


@dataclass(frozen=True)
class Targets:
    host: str
    complete: str  # upload ids
    partials: tuple[str, str]  # complete partial uploads
    half: str  # 5 of 10 bytes
    deferred: str
    token: str  # every action, subject "fuzz"
    other_tokens: tuple[str, ...]  # bound to `half`, read-only, expired, forged, hostile


def signed_json(text: str) -> str:
    """A token over exactly this JSON text (see test_hostile_input.py)."""
    signer = URLSafeSerializer(SECRET, salt=TOKEN_SALT).make_signer()
    return signer.sign(base64_encode(text.encode())).decode("ascii")


HOSTILE_PAYLOADS = (
    '{"sub":"\\ud800","act":["read"],"exp":99999999999}',
    '{"sub":"a","act":["create"],"exp":1e400}',
    '{"sub":"a","act":["create"],"exp":99999999999,"max":1e400}',
    '{"sub":"a","act":["create","upload"],"exp":99999999999,"md":{"k":7}}',
    '{"sub":"' + "s" * 300 + '","act":["read"],"exp":99999999999}',
    '{"sub":"a","act":["create"],"exp":' + "9" * 5000 + "}",
    '["not","an","object"]',
    "not json",
)


async def make_targets(server: ServerProcess) -> Targets:
    def issue(actions: list[str], upload_id: str | None = None, now: float | None = None) -> str:
        return issue_token(
            SECRET, subject="fuzz", actions=actions, ttl_s=3600, upload_id=upload_id, now=now
        )

    token = issue(["create", "upload", "read", "delete"])
    auth = bearer(token)
    async with aiohttp.ClientSession() as http:
        complete = await create_upload(http, server.url, 3, **auth)
        assert (await patch(http, complete, 0, b"abc", **auth)).status == 204
        partials = []
        for data in (b"ab", b"cd"):
            url = await create_upload(http, server.url, 2, **{"Upload-Concat": "partial"}, **auth)
            assert (await patch(http, url, 0, data, **auth)).status == 204
            partials.append(upload_id_of(url))
        half = await create_upload(http, server.url, 10, **auth)
        assert (await patch(http, half, 0, b"12345", **auth)).status == 204
        deferred = await create_upload(
            http, server.url, None, **{"Upload-Defer-Length": "1"}, **auth
        )
    forged = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    return Targets(
        host=server.url.split("/")[2],
        complete=upload_id_of(complete),
        partials=(partials[0], partials[1]),
        half=upload_id_of(half),
        deferred=upload_id_of(deferred),
        token=token,
        other_tokens=(
            issue(["upload", "read"], upload_id=upload_id_of(half)),
            issue(["read"]),
            issue(["read"], now=1e9),
            forged,
            *(signed_json(payload) for payload in HOSTILE_PAYLOADS),
        ),
    )


# -- the mutations, as data -------------------------------------------------------------------

# fmt: off
ODD_NUMBERS = [b"-1", b"1e3", b"0x10", b"9" * 30, b" 5 ", "\u0663".encode(), b"+5", b"5.0", b"",
               b"0" * 40 + b"1", b"18446744073709551616", b"NaN", b"1,2", b"\xff"]
ODD_BYTES = [b"\xff\xfe", "\u00e9\u00e8".encode(), b"\x7f", b"\x00", b"\x01", b"a\tb", b"\xc3",
             b"\xed\xa0\x80", b"%00", b"\\u0000", b"a\r\nX-Injected: 1", b"  "]
ODD_METHODS = ["PUT", "TRACE", "CONNECT", "FOO", "patch", "GET", "POST", "DELETE", "HEAD",
               "OPTIONS", "PROPFIND", "G" * 40, "GET\x00"]
OVERRIDES = [b"PATCH", b"DELETE", b"GET", b"HEAD", b"POST", b"OPTIONS", b"patch", b"FOO", b"",
             b"CONNECT", b"\xff"]
ODD_PATHS = [  # {id}: an upload's id, {half}/{complete}: those uploads, {token}: a valid token
    "/files", "/files/{id}/", "/files/../etc/passwd", "/files/%2e%2e/%2e%2e/etc/passwd",
    "/files/{id}%00", "/files/" + "a" * 33, "/files/" + "a" * 5000, "//files/{id}",
    "/files/{ID}", "/files/%ff", "/files/;x", "/files/ab\\cd", "/redis/valkey.conf",
    "/files/" + "../" * 50 + "x", "/static/../../pyproject.toml", "/static/%2e%2e/pyproject.toml",
    "/static/", "/files/{id}?token=x", "/files/{id}?token={token}", "http://{host}/files/", "*",
    "/files/\u00e9", "/health?x=\u00e9", "/files/{id}#frag", "/files/{half}/../{complete}",
    "/files/%2F{id}", "/nope", "/files/{id}/extra", "/files/batches/..", "/files/batches/%2e",
    "/files/batches/b1/seal/x", "/files/batches/" + "b" * 5000, "/files/batches//seal",
]
ODD_NAMES = [b"X\xffY", b"Upload_Offset", b"", b"X" * 9000, b"Bad Name", b"Content-Length\x00",
             b"Host", b"Expect"]
ODD_AUTHORIZATIONS = [b"Basic YTpi", b"Bearer", b"Bearer a b", b"Bearer " + b"A" * 9000,
                      b"Bearer \xc3\xa9", b"bearer {token}", b"Bearer {token}, Bearer x"]
ADDED_HEADERS: list[tuple[bytes, list[bytes]]] = [
    (b"Upload-Offset", ODD_NUMBERS), (b"Upload-Length", ODD_NUMBERS),
    (b"Upload-Defer-Length", [b"1", b"0", b"2", b"\xff"]),
    (b"Upload-Metadata", [b"k", b"k \xff", b"k a,k b", b" ,", b"k " + b"QQ" * 40_000, b"\xff v",
                          b"filename " + base64.b64encode("\u00e9\x00/../x".encode())]),
    (b"Upload-Concat", [b"final;", b"final; ", b"final;/files/x", b"final;" + b"/files/a " * 200,
                        b"partial;x", b"final;{partials} {partials}"]),
    (b"Upload-Checksum", [b"sha1", b"sha1 !!", b"sha256 AAAA", b"md5 " + b"A" * 5000]),
    (b"Content-Type", [b"text/plain", b"", b"\xff", OFFSET_STREAM.encode() + b"; x=y"]),
    (b"Content-Encoding", [b"gzip", b"br", b"identity", b"\xff", b"gzip, identity"]),
    (b"Expect", [b"100-continue", b"200-ok", b"", b"100-Continue", "\u00e9".encode(), b"\xff\xfe"]),
    (b"Tus-Resumable", [b"0.2.2", b"1.0.0 ", b"", b"\xff"]),
    (b"Origin", [b"null", b"http://localhost:1", b"\xff", b"https://evil.example"]),
    (b"Connection", [b"close", b"upgrade", b"keep-alive, Upgrade"]),
    (b"Upgrade", [b"websocket", b"h2c"]),
    (b"X-Forwarded-Host", [b"evil.example", b"\xff"]), (b"Forwarded", [b"host=evil.example"]),
    (b"Range", [b"bytes=0-", b"bytes=99999999999999999999-", b"bytes=5-1", b"bytes=-0"]),
    (b"Cookie", [b"a=" + b"b" * 5000]),
    (b"Access-Control-Request-Method", [b"PATCH", b"\xff"]),
]
ODD_HOSTS = [[], [b"evil.example"], [b"ev il"], [b"\xc3\xa9"], [b"{host}", b"evil.example"], [b""],
             [b"localhost:1"], [b"{host}", b"{host}"]]
BAD_CHUNKED = [b"zz\r\nabc\r\n0\r\n\r\n", b"-1\r\nabc\r\n0\r\n\r\n", b"3\r\nabcdef\r\n0\r\n\r\n",
               b"3;x=\xff\r\nabc\r\n0\r\n\r\n", b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
               b"3\nabc\n0\n\n", b"3\r\nabc\r\n"]
ODD_TRANSFER_ENCODINGS = [b"gzip, chunked", b"chunked, identity", b"xchunked", b" chunked",
                          b"chunked\x00", b"identity", b"chunked, chunked"]
ODD_VERSIONS = [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.2", b"HTTP/1.1 ", b"http/1.1", b"HTTP/0.9", b""]
# fmt: on


@dataclass
class RequestMaker:
    """Valid tus requests, then mutated; every choice comes from one seeded Random."""

    rng: random.Random
    t: Targets
    placeholders: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        partials = " ".join(f"/files/{pid}" for pid in self.t.partials)
        self.placeholders = {"{token}": self.t.token, "{host}": self.t.host,
                             "{half}": self.t.half, "{complete}": self.t.complete,
                             "{partials}": partials}  # fmt: skip

    def choice(self, options: Sequence[T]) -> T:
        return options[self.rng.randrange(len(options))]

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def fill(self, text: str) -> str:
        upload_id = self.upload_id()
        text = text.replace("{id}", upload_id).replace("{ID}", upload_id.upper())
        for name, value in self.placeholders.items():
            text = text.replace(name, value)
        return text

    def fill_bytes(self, value: bytes) -> bytes:
        return self.fill(value.decode("latin-1")).encode("latin-1")

    def upload_id(self) -> str:
        t = self.t
        ids = [t.complete, t.half, t.deferred, *t.partials, "0" * 32, self.rng.randbytes(16).hex()]
        return self.choice(ids)

    # -- the valid request ----------------------------------------------------------------

    def valid(self) -> tuple[str, str, list[Header], bytes]:
        kind = self.choice(["create", "create", "create_body", "patch", "patch", "patch", "head",
                            "get", "list", "delete", "options", "concat", "health",
                            "batch"])  # fmt: skip
        headers: list[Header] = [(b"Tus-Resumable", b"1.0.0")]
        body = b""
        method, path = "POST", "/files/"
        if kind == "create":
            if self.chance(0.8):
                headers.append((b"Upload-Length", str(self.rng.randrange(0, 3000)).encode()))
            else:
                headers.append((b"Upload-Defer-Length", b"1"))
            if self.chance(0.5):
                name = base64.b64encode(self.rng.randbytes(self.rng.randrange(0, 40)))
                headers.append((b"Upload-Metadata", b"filename " + name + b",empty"))
            if self.chance(0.2):
                headers.append((b"Upload-Concat", b"partial"))
        elif kind == "create_body":
            body = self.rng.randbytes(self.rng.randrange(1, 3000))
            length = len(body) + self.choice([0, 0, 5, -1])
            headers.append((b"Upload-Length", str(length).encode()))
            headers.append((b"Content-Type", OFFSET_STREAM.encode()))
        elif kind == "patch":
            method, path = "PATCH", "/files/" + self.upload_id()
            body = self.rng.randbytes(self.choice([0, 1, 5, 100, 3000, 70_000]))
            offset = self.choice([0, 0, 3, 5, 10, 2**63])
            headers.append((b"Upload-Offset", str(offset).encode()))
            headers.append((b"Content-Type", OFFSET_STREAM.encode()))
            if self.chance(0.2):
                algorithm = self.choice([b"sha1 ", b"md5 ", b"crc32 ", b"sha256 "])
                headers.append(
                    (b"Upload-Checksum", algorithm + base64.b64encode(self.rng.randbytes(20)))
                )
            if self.chance(0.1):
                headers.append((b"Upload-Length", str(self.rng.randrange(0, 100)).encode()))
        elif kind in ("head", "get"):
            method, path = kind.upper(), "/files/" + self.upload_id()
            if kind == "get" and self.chance(0.3):
                headers.append((b"Range", self.choice([b"bytes=0-1", b"bytes=5-", b"bytes=-1"])))
        elif kind == "list":
            limit = self.choice(["1", "1000", "0", "%D9%A1", "9" * 40, "-1", "x"])
            cursor = self.choice(["", "x", "1.000000_" + "a" * 32, "nan_" + "a" * 32])
            method, path = "GET", f"/files/?limit={limit}&cursor={cursor}"
        elif kind == "delete":
            method, path = "DELETE", "/files/" + self.choice(["0" * 32, self.upload_id()])
        elif kind == "options":
            method = "OPTIONS"
            headers.append(
                (b"Origin", self.choice([b"http://localhost:3000", b"https://evil.example"]))
            )
            headers.append((b"Access-Control-Request-Method", b"PATCH"))
        elif kind == "concat":
            parts = [f"/files/{pid}" for pid in self.t.partials]
            parts += self.choice([[], [parts[0]], [f"/files/{self.t.half}"],
                                  [f"/files/../files/{self.t.complete}"],
                                  [f"http://evil.example/files/{self.t.complete}"]])  # fmt: skip
            headers.append((b"Upload-Concat", ("final;" + " ".join(parts)).encode()))
        elif kind == "batch":
            method, path, body = self.batch_request(headers)
        else:
            method, path = "GET", self.choice(["/health", "/"])
        if self.chance(0.85):
            headers.append((b"Authorization", b"Bearer " + self.t.token.encode()))
        return method, path, headers, body

    def batch_request(self, headers: list[Header]) -> tuple[str, str, bytes]:
        """A request of the batch API, or a creation that joins a batch."""
        name = self.choice(["b1", "b2", "x" * 128, "a.b-c_d~e"])
        kind = self.choice(["open", "join", "get", "seal", "delete", "list"])
        if kind == "open":
            headers.append((b"Content-Type", b"application/json"))
            body = {"name": name, "files": self.choice([1, 2, 200]), "metadata": {"k": "v"}}
            return "POST", "/files/batches", json.dumps(body).encode()
        if kind == "join":
            path = self.choice([b"a.txt", b"d/e/f", b"../x", b"d//e", bytes([0xFF])])
            headers += [
                (b"Upload-Length", str(self.rng.randrange(0, 30)).encode()),
                (b"Upload-Metadata", b"batch " + base64.b64encode(name.encode())
                 + b",relativePath " + base64.b64encode(path)),
            ]  # fmt: skip
            return "POST", "/files/", b""
        if kind == "list":
            return "GET", f"/files/?batch={name}", b""
        method = {"get": "GET", "seal": "POST", "delete": "DELETE"}[kind]
        return method, f"/files/batches/{name}" + ("/seal" if kind == "seal" else ""), b""

    # -- mutations ------------------------------------------------------------------------

    def mutate_headers(self, headers: list[Header]) -> list[Header]:
        ops = ["drop", "duplicate", "conflict", "odd", "name", "case", "token", "add", "add", "add"]
        for _ in range(self.choice([0, 0, 1, 1, 2, 3])):
            op = self.choice(ops)
            if op == "token":
                headers = [h for h in headers if h[0].lower() != b"authorization"]
                token = b"Bearer " + self.choice(self.t.other_tokens).encode()
                odd = self.fill_bytes(self.choice(ODD_AUTHORIZATIONS))
                headers.append((b"Authorization", self.choice([token, token, odd])))
            elif op == "add" or not headers:
                name, values = self.choice(ADDED_HEADERS)
                headers.append((name, self.fill_bytes(self.choice(values))))
            else:
                i = self.rng.randrange(len(headers))
                name, value = headers[i]
                odd = self.choice([self.choice(ODD_NUMBERS), self.choice(ODD_BYTES),
                                   b"a" * self.choice([1000, 9000, 70_000])])  # fmt: skip
                if op == "drop":
                    del headers[i]
                elif op == "duplicate":
                    headers.insert(self.rng.randrange(len(headers) + 1), (name, value))
                elif op == "conflict":
                    headers.append((name, odd))
                elif op == "odd":
                    headers[i] = (name, odd)
                elif op == "name":
                    headers[i] = (self.choice([name + b" ", b" " + name, *ODD_NAMES]), value)
                else:
                    headers[i] = (name.swapcase(), value)
        return headers

    def host(self) -> list[Header]:
        hosts = [self.t.host.encode()] if self.chance(0.9) else self.choice(ODD_HOSTS)
        return [(b"Host", self.fill_bytes(host)) for host in hosts]

    def frame(self, headers: list[Header], body: bytes) -> tuple[list[Header], bytes]:
        """The body and the headers that say how long it is, honestly or not."""
        how = self.choice(["length"] * 30 + ["short", "long", "none", "chunked", "bad_chunked",
                           "both", "odd_te", "two_lengths", "odd_length"])  # fmt: skip
        size = str(len(body)).encode()
        if how == "long":  # waits for --idle-timeout
            return [*headers, (b"Content-Length", str(len(body) + 10).encode())], body
        if how == "short" and body:
            return [*headers, (b"Content-Length", str(len(body) // 2).encode())], body
        if how == "none":
            return headers, body
        if how in ("chunked", "both"):
            pieces = [piece for piece in (body[:7], body[7:]) if piece]
            chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
            extra = [(b"Content-Length", size)] if how == "both" else []
            return [*headers, (b"Transfer-Encoding", b"chunked"), *extra], chunked
        if how == "bad_chunked":
            return [*headers, (b"Transfer-Encoding", b"chunked")], self.choice(BAD_CHUNKED)
        if how == "odd_te":
            te = self.choice(ODD_TRANSFER_ENCODINGS)
            return [*headers, (b"Transfer-Encoding", te), (b"Content-Length", size)], body
        if how == "two_lengths":
            return [*headers, (b"Content-Length", size), (b"Content-Length", b"1")], body
        if how == "odd_length":
            return [*headers, (b"Content-Length", self.choice(ODD_NUMBERS))], body
        return [*headers, (b"Content-Length", size)], body

    def request(self) -> bytes:
        """One mutated request, as bytes."""
        method, path, headers, body = self.valid()
        if self.chance(0.08):
            method = self.choice(ODD_METHODS)
        if self.chance(0.08):
            headers.append((b"X-HTTP-Method-Override", self.choice(OVERRIDES)))
        if self.chance(0.12):
            path = self.fill(self.choice(ODD_PATHS))
        headers, body = self.frame([*self.host(), *self.mutate_headers(headers)], body)
        version = b"HTTP/1.1" if self.chance(0.95) else self.choice(ODD_VERSIONS)
        lines = [method.encode("latin-1") + b" " + path.encode() + b" " + version]
        lines += [name + b": " + value for name, value in headers]
        end = b"\r\n" if self.chance(0.97) else self.choice([b"\n", b"\r", b"\r\r\n"])
        data = end.join(lines) + end + end + body
        if self.chance(0.01):  # cut off anywhere: the header or body timeout answers
            data = data[: self.rng.randrange(len(data))]
        return data


# -- sending them -----------------------------------------------------------------------------


async def first_answer(url: str, data: bytes) -> int | str:
    """The status of the server's first final answer to `data` on a new connection, or
    "closed" if it closed the connection without one; TimeoutError past DEADLINE_S."""
    request = await RawRequest.connect(url)
    try:
        try:
            await request.send(data)
        except OSError:
            pass  # it answered (or closed) before taking everything: read what it said
        async with asyncio.timeout(DEADLINE_S):
            while True:
                try:
                    answer = await request.response(timeout_s=DEADLINE_S, has_body=False)
                except (ConnectionError, asyncio.IncompleteReadError):
                    return "closed"
                if answer.status >= 200:  # not an interim 100 Continue
                    return answer.status
    finally:
        await request.close()


async def health(server: ServerProcess) -> int | str:
    data = request_bytes("GET", "/health", [("Host", server.url.split("/")[2])])
    try:
        return (await exchange(server.url, data, timeout_s=DEADLINE_S)).status
    except (OSError, TimeoutError) as error:
        return repr(error)


@dataclass
class Outcome:
    statuses: Counter[int | str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)


async def fuzz(server: ServerProcess, requests: list[bytes]) -> Outcome:
    """Send every request, CONCURRENCY at a time; stop after a few failures."""
    outcome = Outcome()
    waiting = list(enumerate(requests))[::-1]

    async def worker() -> None:
        while waiting and len(outcome.failures) < 5:
            index, data = waiting.pop()
            shown = f"request {index} of seed {SEED}: {data[:600]!r}"
            try:
                status = await first_answer(server.url, data)
            except TimeoutError:
                then = await health(server)
                outcome.failures.append(
                    f"no answer in {DEADLINE_S:g} s (/health: {then}) to {shown}"
                )
                continue
            except OSError as error:
                outcome.failures.append(f"{error!r} on {shown}")
                continue
            outcome.statuses[status] += 1
            if isinstance(status, int) and status >= 500:
                outcome.failures.append(f"{status} for {shown}")
            if server.process.poll() is not None:
                outcome.failures.append(f"the process died after {shown}")
            elif index % 250 == 0 and (now := await health(server)) != 200:
                outcome.failures.append(f"/health answered {now} after {shown}")

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return outcome


def log_records(log: str) -> list[str]:
    """The server's log, one record (with its traceback lines, if any) per item."""
    return re.split(r"\n(?=\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} )", log)


@pytest.mark.slow
async def test_mutated_requests_get_no_5xx_no_hang_and_write_nowhere_else(
    fuzzed_process: ServerProcess,
) -> None:
    server = fuzzed_process
    maker = RequestMaker(random.Random(SEED), await make_targets(server))
    outcome = await fuzz(server, [maker.request() for _ in range(REQUESTS)])
    assert outcome.failures == [], (outcome.failures, outcome.statuses)
    assert server.process.poll() is None, server.log()
    assert await health(server) == 200
    # the fuzz reached the handlers as well as the parser: every kind of answer came back
    assert {200, 201, 204, 400, 401, 404, 408, 412, 415}.issubset(outcome.statuses), (
        outcome.statuses
    )
    assert [record for record in log_records(server.log()) if "Traceback" in record] == []
    data_dir = server.data_dir
    outside = [
        p
        for p in data_dir.rglob("*")
        if p.relative_to(data_dir).parts[0] not in ("uploads", "redis")
    ]
    assert outside == []
    assert sorted(p.name for p in data_dir.parent.iterdir()) == ["data", server.log_path.name]
