"""Talking to the parent service: signed JSON POSTs and the pre-create check.

Webhook deliveries (events.py) and pre-create questions are signed the same way:
`Tus-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, one v1 per secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from tusserver import protocol
from tusserver.errors import Forbidden, ServiceUnavailable
from tusserver.settings import Settings

log = logging.getLogger("tusserver.events.parent")

SIGNATURE_HEADER = "Tus-Signature"
MAX_REASON_CHARS = 200
USER_AGENT = "tusserver"
# Told the result of each question to the parent or try of a webhook (the metrics listen).
CountResult = Callable[[str], None]


def _uncounted(_result: str) -> None:
    return None


# -- signatures ----------------------------------------------------------------------------


def signature_header(signing_secrets: Sequence[str], body: bytes, timestamp: int) -> str:
    """`t=<unix seconds>,v1=<hex>` with one v1 per secret: HMAC-SHA256 of `<t>.<body>`."""
    signed = f"{timestamp}.".encode() + body
    parts = [f"t={timestamp}"]
    for secret in signing_secrets:
        digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
        parts.append(f"v1={digest}")
    return ",".join(parts)


def verify_signature(
    header: str,
    body: bytes,
    signing_secrets: Sequence[str],
    *,
    now: float | None = None,
    tolerance_s: float = 300.0,
) -> bool:
    """True if `header` signs `body` with one of `signing_secrets` and its time is within
    `tolerance_s` of `now` (what a parent written in Python does with each request)."""
    fields = [part.strip().partition("=") for part in header.split(",")]
    stamps = [value for name, _eq, value in fields if name == "t"]
    given = [value for name, _eq, value in fields if name == "v1"]
    if len(stamps) != 1 or not (stamps[0].isascii() and stamps[0].isdigit()) or not given:
        return False
    now = time.time() if now is None else now
    if abs(now - int(stamps[0])) > tolerance_s:
        return False
    signed = f"{stamps[0]}.".encode() + body
    for secret in signing_secrets:
        expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest().encode()
        if any(hmac.compare_digest(expected, candidate.encode()) for candidate in given):
            return True
    return False


def signing_secrets_of(settings: Settings) -> tuple[str, ...]:
    """--webhook-secret if set, else the token secrets; () means unsigned (development)."""
    return (settings.webhook_secret,) if settings.webhook_secret else settings.secrets


def post_headers(signing_secrets: Sequence[str], body: bytes) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if signing_secrets:
        headers[SIGNATURE_HEADER] = signature_header(signing_secrets, body, int(time.time()))
    return headers


async def read_some(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Up to `limit` bytes of the answer's body (a parent's answer is not worth more)."""
    data = b""
    while len(data) < limit and (chunk := await response.content.read(limit - len(data))):
        data += chunk
    return data


def json_bytes(payload: Mapping[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


# -- the pre-create check --------------------------------------------------------------------


class PreCreateCheck:
    """Asks the parent whether to accept an upload before it is created (--pre-create-url).

    Without a URL every upload passes. The parent answers 2xx to accept and 4xx to refuse
    (the client gets 403 with the parent's reason); 5xx, no answer in time or no connection
    make the client retry later (503). Each question's result ("accepted", "refused",
    "failed") is told to `count`."""

    def __init__(self, settings: Settings, count: CountResult = _uncounted) -> None:
        self.count = count
        self.url = settings.pre_create_url
        self.timeout_s = settings.pre_create_timeout_s
        self.signing_secrets = signing_secrets_of(settings)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self.url is not None and not self.signing_secrets:
            log.warning("pre-create requests are sent unsigned: set --webhook-secret")
        if self.url is not None and self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(
        self,
        subject: str,
        length: int | None,
        metadata: Mapping[str, bytes | None],
        concat: protocol.Concat | None,
    ) -> None:
        """Return if the parent accepts; Forbidden (403) with its reason if it refuses;
        ServiceUnavailable (503) if it fails or does not answer in time."""
        if self.url is None:
            return
        try:
            await self._ask(self.url, subject, length, metadata, concat)
        except Forbidden:
            self.count("refused")
            raise
        except ServiceUnavailable:
            self.count("failed")
            raise
        self.count("accepted")

    async def _ask(
        self,
        url: str,
        subject: str,
        length: int | None,
        metadata: Mapping[str, bytes | None],
        concat: protocol.Concat | None,
    ) -> None:
        if self._session is None:
            raise ServiceUnavailable("the server is starting or stopping; retry shortly")
        body = json_bytes(
            {
                "type": "pre-create",
                "subject": subject,
                "length": length,
                "metadata": protocol.metadata_text(metadata),
                "upload_metadata": protocol.format_metadata(metadata),
                "concat": None if concat is None else "final" if concat.is_final else "partial",
            }
        )
        headers = post_headers(self.signing_secrets, body)
        try:
            async with self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status, answer = response.status, await read_some(response, 4096)
        except (TimeoutError, aiohttp.ClientError) as error:
            log.warning("pre-create check got no answer: %s", type(error).__name__)
            raise ServiceUnavailable("the upload could not be confirmed; retry later") from None
        if 200 <= status < 300:
            return
        if 400 <= status < 500:
            raise Forbidden(_reason(answer) or "the upload was refused")
        log.warning("pre-create check answered HTTP %d", status)
        raise ServiceUnavailable("the upload could not be confirmed; retry later")


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]+")


def _reason(answer: bytes) -> str:
    """The parent's reason as one short line: a JSON object's `reason`, else the text."""
    text = answer.decode("utf-8", errors="replace")
    with contextlib.suppress(ValueError):
        parsed = json.loads(text)
        if isinstance(parsed, dict) and isinstance(parsed.get("reason"), str):
            text = parsed["reason"]
    text = " ".join(_CONTROL_CHARS.sub(" ", text).split())
    return text[: MAX_REASON_CHARS - 3] + "..." if len(text) > MAX_REASON_CHARS else text
