"""Every setting of tusserver in one frozen dataclass: flags > TUS_* environment > defaults.

Sizes accept plain bytes or units (`10GB` = 10**10 bytes, `10GiB` = 10 * 2**30 bytes);
durations accept `90s`, `15m`, `24h`, `7d` or plain seconds. Values are validated once, when
the settings are built; a bad value raises `SettingError` with a one-line reason.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tusserver.protocol import split_host

FsyncPolicy = Literal["always", "complete", "never"]

_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}  # fmt: skip
# Bodies of a known size from this up are read straight from their sockets (above). One
# sequential stream of 8 MiB PATCHes was 10-20% slower read that way than on the loop
# (benchmark b, alternating rounds), a 2 GiB PATCH 20-30% faster and 32 concurrent 64 MiB
# ones 30-50% faster.
DIRECT_BODY_BYTES = 16 * 2**20
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_NUMBER_WITH_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


class SettingError(ValueError):
    """A setting with a value tusserver cannot use; the message is one line for the user."""


def parse_size(value: str) -> int:
    """Parse `1048576`, `10MB` (10**7) or `10MiB` (10 * 2**20) into bytes."""
    match = _NUMBER_WITH_UNIT.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise SettingError(f"{value!r} is not a size (examples: 1048576, 500MB, 10GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(value: str) -> float:
    """Parse `90s`, `15m`, `24h`, `7d`, `250ms` or plain seconds into seconds."""
    match = _NUMBER_WITH_UNIT.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _DURATION_UNITS:
        raise SettingError(f"{value!r} is not a duration (examples: 90s, 15m, 24h, 7d)")
    return float(match.group(1)) * _DURATION_UNITS[unit]


def parse_int(value: str) -> int:
    if not value.strip().isdigit():
        raise SettingError(f"{value!r} is not a whole number")
    return int(value)


def parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise SettingError(f"{value!r} is not a yes/no value (use 1 or 0)")


@functools.lru_cache(maxsize=256)  # asked on every creation, of the few names clients use
def is_loopback_host(host: str) -> bool:
    """True for hosts that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Settings:
    """All settings, validated. Field names carry their units; `repr` hides secrets."""

    host: str = "127.0.0.1"
    port: int = 1080
    base_path: str = "/files/"
    public_url: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    behind_proxy: bool = False
    data_dir: Path = Path("tus-data")
    redis_url: str | None = None
    max_size_bytes: int | None = None
    expire_after_s: float = 24 * 3600.0
    retention_s: float | None = None
    log_json: bool = False
    secrets: tuple[str, ...] = field(default=(), repr=False)
    production: bool = False
    workers: int = 1
    idle_timeout_s: float = 60.0
    fsync: FsyncPolicy = "always"
    # Under fsync "always": an upload's offset goes to Redis's AOF at most this often (and
    # when it completes); 0: at every commit (UploadState.commit).
    offset_checkpoint_s: float = 10.0
    min_free_disk_bytes: int = 0
    body_memory_bytes: int = 24 * 2**20
    # Bodies read straight from their sockets in threads at once (0: every body is read on
    # the event loop), and the smallest body read that way (no option: the tests lower it);
    # files/receive.py, uploads/receiving.py.
    receive_threads: int = 32
    receive_min_bytes: int = DIRECT_BODY_BYTES
    cors_origins: tuple[str, ...] = ()
    # A cookie that may carry the signed token too ("" : none); accepted only from an
    # allowed origin (http/middleware.py, docs/tokens.md).
    token_cookie: str = ""
    demo_page: bool | None = None
    tombstone_ttl_s: float = 7 * 24 * 3600.0
    # The status the owner of a terminated or expired upload gets while its tombstone lasts:
    # 404 (mobile tus clients start over only on 404) or 410; other subjects always get 404.
    gone_status: int = 404
    sweep_interval_s: float = 30.0
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    webhook_timeout_s: float = 10.0
    webhook_max_tries: int = 20
    webhook_max_age_s: float = 24 * 3600.0
    webhook_backoff_s: float = 1.0  # before the 2nd try, doubling up to webhook_backoff_max_s
    webhook_backoff_max_s: float = 600.0
    pre_create_url: str | None = None
    pre_create_timeout_s: float = 3.0
    max_header_bytes: int = 96 * 2**10
    header_timeout_s: float = 30.0
    keepalive_timeout_s: float = 75.0
    max_connections: int = 4096
    max_concat_parts: int = 128
    max_batch_files: int = 10_000  # members one batch may have (its event lists them all)
    max_form_files: int = 64  # file parts of one multipart form
    max_form_fields: int = 32  # text fields of one multipart form
    orphan_grace_s: float = 3600.0
    metrics: bool = True
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, serve HTTPS
    tls_key: Path | None = None
    unix_socket: Path | None = None  # listen here instead of --host/--port
    metrics_token: str | None = field(default=None, repr=False)
    # After SIGTERM, /ready answers 503 at once while the listener stays open this long, so a
    # load balancer that polls /ready stops sending before connections are refused.
    drain_delay_s: float = 0.0
    # The embedded Valkey's AOF folder, when it runs `appendfsync no` and each serving process
    # syncs that AOF itself (store/aof.py). Set by the supervisor, not an option.
    own_aof_dir: Path | None = None

    @property
    def is_secured(self) -> bool:
        """A secret is configured: every request but OPTIONS needs a token."""
        return bool(self.secrets)

    @property
    def shows_demo_page(self) -> bool:
        return self.demo_page if self.demo_page is not None else not self.is_secured

    def __post_init__(self) -> None:
        if not self.base_path.startswith("/"):
            raise SettingError(f"--base-path must start with '/', got {self.base_path!r}")
        if not self.base_path.endswith("/"):
            object.__setattr__(self, "base_path", self.base_path + "/")
        if not 0 < self.port < 65536 and self.port != 0:
            raise SettingError(f"--port must be between 1 and 65535, got {self.port}")
        if self.workers < 1:
            raise SettingError(f"--workers must be at least 1, got {self.workers}")
        if self.max_size_bytes is not None and self.max_size_bytes <= 0:
            raise SettingError("--max-size must be positive")
        if self.expire_after_s <= 0:
            raise SettingError("--expire-after must be positive")
        if self.offset_checkpoint_s < 0:
            raise SettingError("--offset-checkpoint must not be negative")
        if self.idle_timeout_s <= 0:
            raise SettingError("--idle-timeout must be positive")
        if self.body_memory_bytes < 2**20:
            raise SettingError("--body-memory must be at least 1MiB")
        if self.receive_threads < 0:
            raise SettingError("--receive-threads must not be negative")
        if self.fsync not in ("always", "complete", "never"):
            raise SettingError(f"--fsync must be always, complete or never, got {self.fsync!r}")
        if self.public_url is not None and not re.match(r"^https?://[^/]+", self.public_url):
            raise SettingError(f"--public-url must be an absolute http(s) URL: {self.public_url}")
        for flag, url in (("webhook", self.webhook_url), ("pre-create", self.pre_create_url)):
            if url is not None and not re.match(r"^https?://[^/]+", url):
                raise SettingError(f"--{flag}-url must be an absolute http(s) URL")
        if self.webhook_timeout_s <= 0 or self.pre_create_timeout_s <= 0:
            raise SettingError("--webhook-timeout and --pre-create-timeout must be positive")
        if self.webhook_max_tries < 1:
            raise SettingError("--webhook-max-tries must be at least 1")
        if self.max_header_bytes < 8 * 2**10:
            raise SettingError("--max-header-size must be at least 8KiB")
        for flag, seconds in (
            ("header-timeout", self.header_timeout_s),
            ("keepalive-timeout", self.keepalive_timeout_s),
            ("orphan-grace", self.orphan_grace_s),
        ):
            if seconds <= 0:
                raise SettingError(f"--{flag} must be positive")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SettingError("--tls-cert and --tls-key go together")
        if self.gone_status not in (404, 410):
            raise SettingError(f"--gone-status must be 404 or 410, got {self.gone_status}")
        counts = (self.max_connections, self.max_concat_parts, self.max_batch_files,
                  self.max_form_files, self.max_form_fields)  # fmt: skip
        if min(counts) < 1:
            raise SettingError(
                "--max-connections, --max-concat-parts, --max-batch-files, --max-form-files "
                "and --max-form-fields must be at least 1"
            )
        for allowed in self.allowed_hosts:
            if not split_host(allowed)[0]:
                raise SettingError(f"--allowed-hosts: {allowed!r} is not a host or host:port")
        if not self.secrets and (self.production or not is_loopback_host(self.host)):
            why = "--production" if self.production else f"--host {self.host} (not loopback)"
            raise SettingError(
                f"{why} needs a secret: set --secret or TUS_SECRET "
                "(without one anybody could upload)"
            )
        if self.secrets and self.public_url is None and not self.allowed_hosts:
            raise SettingError(
                "a secured server needs --public-url or --allowed-hosts: upload URLs (stored, "
                "and sent to the parent in events) must not come from any client's Host header"
            )

    def is_allowed_host(self, host: str) -> bool:
        """Whether upload URLs may be built from this Host (or X-Forwarded-Host): one of
        --allowed-hosts (a name alone allows any port), or in development mode a loopback
        name."""
        name, port = split_host(host.strip())
        if not name:
            return False
        if not self.allowed_hosts:
            return not self.is_secured and is_loopback_host(name)
        for allowed in self.allowed_hosts:
            allowed_name, allowed_port = split_host(allowed)
            if allowed_name.lower() == name.lower() and allowed_port in ("", port):
                return True
        return False


# name -> (parser from text, help, metavar). The names are the flags (--name) and, upper-cased
# with TUS_ in front, the environment variables.
Option = tuple[str, Any, str, str | None]
OPTIONS: tuple[Option, ...] = (
    ("host", str, "address to listen on; not loopback requires a secret", "ADDR"),
    ("port", parse_int, "port to listen on", "PORT"),
    ("base-path", str, "path of the upload endpoint", "PATH"),
    ("public-url", str, "absolute URL of the endpoint as clients see it (for Location)", "URL"),
    (
        "allowed-hosts",
        str,
        "Host names (or host:port) upload URLs may be built from when there is no "
        "--public-url, comma-separated (required with a secret unless --public-url is set)",
        "HOSTS",
    ),
    ("behind-proxy", parse_bool, "trust X-Forwarded-*/Forwarded headers from a proxy", None),
    ("data-dir", Path, "folder for upload files and the embedded Redis", "DIR"),
    (
        "redis-url",
        str,
        "use this Redis/Valkey (redis://, rediss://, unix://) instead of the embedded one",
        "URL",
    ),
    (
        "max-size",
        parse_size,
        "largest upload accepted (Tus-Max-Size), and the most the file "
        "parts of one form upload may hold together, e.g. 50GiB",
        "SIZE",
    ),
    (
        "expire-after",
        parse_duration,
        "unfinished uploads expire this long after their last activity",
        "DURATION",
    ),
    (
        "retention",
        parse_duration,
        "delete completed uploads this long after completion (default: keep until deleted)",
        "DURATION",
    ),
    ("log-json", parse_bool, "log one JSON object per line", None),
    (
        "secret",
        str,
        "shared secret for tokens; repeat (or comma-separate TUS_SECRET) to "
        "rotate: sign with the first, accept any",
        "SECRET",
    ),
    (
        "gone-status",
        parse_int,
        "status for the owner of a terminated or expired upload: 404 (stock mobile clients "
        "then start over) or 410 (the reason is in the body either way)",
        "STATUS",
    ),
    ("production", parse_bool, "refuse to start without a secret", None),
    ("workers", parse_int, "worker processes serving the port", "N"),
    ("idle-timeout", parse_duration, "end a PATCH whose body stalls this long", "DURATION"),
    (
        "fsync",
        str,
        "when bytes are fsynced: always (before each commit), complete (when the "
        "upload completes), never",
        "POLICY",
    ),
    (
        "offset-checkpoint",
        parse_duration,
        "with --fsync always, write an upload's offset to Redis's AOF at most this often "
        "and when it completes; after Redis restarts, offsets may be this far (and a second) "
        "behind the bytes on disk (0: at every commit)",
        "DURATION",
    ),
    ("min-free-disk", parse_size, "refuse writes with 507 when less is free", "SIZE"),
    (
        "body-memory",
        parse_size,
        "request bodies a worker gathers in memory at once, shared by its uploads",
        "SIZE",
    ),
    (
        "receive-threads",
        parse_int,
        "bodies of 16 MiB or more (plain HTTP, known size) a worker reads straight from "
        "their sockets at once, a thread each, off the event loop; others are read on the "
        "loop (0: all)",
        "N",
    ),
    (
        "cors-origins",
        str,
        "origins allowed by CORS, comma-separated (default: loopback origins in "
        "development mode, none when secured)",
        "ORIGINS",
    ),
    (
        "token-cookie",
        str,
        "accept the signed token from this cookie too, from --cors-origins or the server's "
        "own origin only",
        "NAME",
    ),
    (
        "demo-page",
        parse_bool,
        "serve the demo upload page at / (default: on without a secret)",
        None,
    ),
    ("webhook-url", str, "POST upload events to this URL", "URL"),
    (
        "webhook-secret",
        str,
        "sign webhook and pre-create requests with this secret instead of the token secrets",
        "SECRET",
    ),
    ("webhook-timeout", parse_duration, "wait this long for the webhook's answer", "DURATION"),
    ("webhook-max-tries", parse_int, "tries before an event goes to the dead-letter stream", "N"),
    ("webhook-max-age", parse_duration, "retry an event no longer than this", "DURATION"),
    ("pre-create-url", str, "ask this URL before creating an upload (2xx: accept)", "URL"),
    ("pre-create-timeout", parse_duration, "answer 503 if pre-create is slower", "DURATION"),
    (
        "max-header-size",
        parse_size,
        "largest header block of a request (431 past it); Upload-Metadata takes up to 64KiB",
        "SIZE",
    ),
    (
        "header-timeout",
        parse_duration,
        "close a connection whose request headers take longer than this",
        "DURATION",
    ),
    (
        "keepalive-timeout",
        parse_duration,
        "close a keep-alive connection idle this long",
        "DURATION",
    ),
    ("max-connections", parse_int, "open connections a worker keeps (new ones are closed)", "N"),
    ("max-concat-parts", parse_int, "partial uploads one final upload may name", "N"),
    ("max-batch-files", parse_int, "files one batch may hold (its event lists them all)", "N"),
    ("max-form-files", parse_int, "file parts one multipart form may have", "N"),
    ("max-form-fields", parse_int, "text fields one multipart form may have (4KiB each)", "N"),
    (
        "orphan-grace",
        parse_duration,
        "remove upload files that no record names once they are this old",
        "DURATION",
    ),
    ("metrics", parse_bool, "serve Prometheus metrics at GET /metrics (summed over workers)", None),
    (
        "metrics-token",
        str,
        "require `Authorization: Bearer <token>` on /metrics (for a public port)",
        "TOKEN",
    ),
    ("tls-cert", Path, "serve HTTPS with this PEM certificate (chain); reloaded on SIGHUP", "FILE"),
    ("tls-key", Path, "the PEM private key of --tls-cert", "FILE"),
    (
        "unix-socket",
        Path,
        "listen on this unix socket (for a local proxy) instead of --host and --port",
        "PATH",
    ),
    (
        "drain-delay",
        parse_duration,
        "after SIGTERM, answer 503 on /ready but keep serving this long before closing the "
        "listener, so a load balancer stops sending first (a second SIGTERM ends it)",
        "DURATION",
    ),
)

_DEFAULT = Settings.__dataclass_fields__

_FIELD_OF_OPTION = {
    "max-size": "max_size_bytes",
    "expire-after": "expire_after_s",
    "retention": "retention_s",
    "idle-timeout": "idle_timeout_s",
    "min-free-disk": "min_free_disk_bytes",
    "body-memory": "body_memory_bytes",
    "secret": "secrets",
    "webhook-timeout": "webhook_timeout_s",
    "webhook-max-age": "webhook_max_age_s",
    "pre-create-timeout": "pre_create_timeout_s",
    "max-header-size": "max_header_bytes",
    "header-timeout": "header_timeout_s",
    "keepalive-timeout": "keepalive_timeout_s",
    "orphan-grace": "orphan_grace_s",
    "offset-checkpoint": "offset_checkpoint_s",
    "drain-delay": "drain_delay_s",
}


def field_of(option: str) -> str:
    return _FIELD_OF_OPTION.get(option, option.replace("-", "_"))


def env_name(option: str) -> str:
    return "TUS_" + option.upper().replace("-", "_")


def default_text(option: str) -> str:
    """The default of an option, as --help shows it."""
    default = _DEFAULT[field_of(option)].default
    shown = {
        "max-size": "none", "retention": "keep until deleted", "redis-url": "embedded Valkey",
        "public-url": "from the request", "expire-after": "24h", "idle-timeout": "60s",
        "min-free-disk": "0", "body-memory": "24MiB", "secret": "none (development mode)",
        "cors-origins": "see above", "allowed-hosts": "loopback names without a secret",
        "max-header-size": "96KiB", "header-timeout": "30s", "keepalive-timeout": "75s",
        "orphan-grace": "1h", "offset-checkpoint": "10s", "metrics": "on",
        "metrics-token": "none (no token needed)",
        "tls-cert": "none (plain HTTP)", "tls-key": "none", "unix-socket": "none (TCP)",
        "demo-page": "on without a secret", "token-cookie": "none (header only)",
        "webhook-url": "none", "webhook-secret": "each --secret", "webhook-timeout": "10s",
        "webhook-max-age": "24h", "pre-create-url": "none (off)", "pre-create-timeout": "3s",
        "drain-delay": "0s (close at once)",
    }  # fmt: skip
    return shown.get(option, str(default))


def build_settings(flags: Mapping[str, Any], environ: Mapping[str, str]) -> Settings:
    """Merge flags (already parsed; None when not given) over TUS_* variables over defaults."""
    values: dict[str, Any] = {}
    for option, parse, _help, _metavar in OPTIONS:
        name = field_of(option)
        flag_value = flags.get(name)
        if option == "secret":
            secrets = list(flag_value or [])
            if not secrets and environ.get(env_name(option)):
                secrets = [s.strip() for s in environ[env_name(option)].split(",")]
            if any(not s for s in secrets):
                raise SettingError("a secret must not be empty")
            if secrets:
                values[name] = tuple(secrets)
            continue
        if flag_value is None and environ.get(env_name(option), "") != "":
            try:
                flag_value = parse(environ[env_name(option)])
            except (ValueError, SettingError) as error:
                raise SettingError(f"{env_name(option)}: {error}") from None
        if flag_value is None:
            continue
        if option == "cors-origins":
            flag_value = tuple(o.strip().rstrip("/") for o in str(flag_value).split(",") if o)
        if option == "allowed-hosts":
            flag_value = tuple(h.strip() for h in str(flag_value).split(",") if h.strip())
        values[name] = flag_value
    return Settings(**values)
