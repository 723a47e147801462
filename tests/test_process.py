"""Real `tusserver` processes: restarts, a second server on the same data, an orphaned
embedded Valkey, the embedded Valkey dying, the command line and the access log.

Each process gets its own data directory under tmp_path and so its own embedded Valkey; the
`processes` fixture kills whatever is still running at the end, by pid.
"""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.files import file_of
from tests.support.processes import StartProcess, pid_is_gone
from tests.support.tus import (
    TUS,
    completed_digest,
    create_upload,
    head_offset,
    patch_headers,
    repr_digest_of,
    upload_id_of,
)
from tests.support.waiting import wait_until, wait_until_sync
from tusserver.auth import DEFAULT_LEEWAY_S, verify_token
from tusserver.errors import Unauthorized
from tusserver.settings import OPTIONS, build_settings, default_text, env_name

CLI_TIMEOUT_S = 60


def tusserver_executable() -> str:
    script = Path(sys.executable).parent / "tusserver"
    assert script.exists(), f"the tusserver script is not installed next to {sys.executable}"
    return str(script)


def clean_environ(**extra: str) -> dict[str, str]:
    """This environment without TUS_* settings (so none leaks into a test), plus `extra`."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("TUS_")}
    return {**kept, **extra}


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tusserver_executable(), *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        env=env if env is not None else clean_environ(),
    )


def valkey_pid(data_dir: Path) -> int:
    return int((data_dir / "redis" / "valkey.pid").read_text().strip())


# -- restarts ------------------------------------------------------------------------------


async def test_restart_mid_upload_resumes_at_the_committed_offset(
    processes: StartProcess, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data_dir = tmp_path / "data"
    payload = os.urandom(3 * 2**20 + 17)
    half = len(payload) // 2
    first = processes(data_dir)
    upload_id = upload_id_of(await create_upload(http, first.url, len(payload)))
    async with http.patch(
        first.url + upload_id, data=io.BytesIO(payload[:half]), headers=patch_headers(0)
    ) as response:
        assert response.status == 204
    assert first.stop(signal.SIGTERM) == 0

    second = processes(data_dir)
    url = second.url + upload_id
    assert await head_offset(http, url) == half
    rest = io.BytesIO(payload[half:])
    async with http.patch(url, data=rest, headers=patch_headers(half)) as response:
        assert response.status == 204
        assert response.headers["Upload-Offset"] == str(len(payload))
    assert file_of(data_dir, upload_id).read_bytes() == payload
    assert await completed_digest(http, url) == repr_digest_of(payload)


def test_second_tusserver_on_the_same_data_dir_refuses(
    processes: StartProcess, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    first = processes(data_dir)
    result = run_cli(
        "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)
    )  # fmt: skip
    assert result.returncode != 0
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1, result.stderr
    assert "another tusserver" in errors[0] and str(data_dir.resolve()) in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert first.process.poll() is None  # the first one is untouched


async def test_restart_after_a_killed_supervisor_adopts_the_orphaned_valkey(
    processes: StartProcess, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data_dir = tmp_path / "data"
    first = processes(data_dir)
    upload_id = upload_id_of(await create_upload(http, first.url, 10))
    async with http.patch(first.url + upload_id, data=b"abc", headers=patch_headers(0)) as r:
        assert r.status == 204
    orphan = valkey_pid(data_dir)
    first.stop(signal.SIGKILL)
    assert not pid_is_gone(orphan)  # the supervisor died; its Valkey did not

    second = processes(data_dir)
    assert "adopted" in second.log()
    assert valkey_pid(data_dir) == orphan
    assert await head_offset(http, second.url + upload_id) == 3
    assert second.stop(signal.SIGTERM) == 0
    wait_until_sync(
        lambda: pid_is_gone(orphan), 20, 0.05, what="a clean stop ended the adopted Valkey too"
    )


async def test_embedded_valkey_dying_makes_tusserver_exit_non_zero(
    processes: StartProcess, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    data_dir = tmp_path / "data"
    server = processes(data_dir)
    await create_upload(http, server.url, 10)  # serving, past its start
    os.kill(valkey_pid(data_dir), signal.SIGKILL)
    code = server.process.wait(timeout=30)
    assert code != 0
    assert "embedded Redis server stopped unexpectedly" in server.log()


def test_unreachable_redis_at_start_exits_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "no-redis-here.sock"
    result = run_cli(
        "--host", "127.0.0.1", "--port", "0", "--data-dir", str(tmp_path / "data"),
        "--redis-url", f"unix://{missing}",
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert str(missing) in result.stderr.strip().splitlines()[-1]  # the last line says why


# -- the command line ----------------------------------------------------------------------

INVALID_SETTINGS = [
    (["--max-size", "lots"], {}, "lots"),
    (["--expire-after", "forever"], {}, "forever"),
    ([], {"TUS_PORT": "abc"}, "TUS_PORT"),
    (["--host", "0.0.0.0"], {}, "secret"),  # noqa: S104 (refused, never bound)
    (["--production"], {}, "secret"),
    (["--gone-status", "403"], {}, "gone-status"),
    ([], {"TUS_GONE_STATUS": "200"}, "gone-status"),
]


@pytest.mark.parametrize(("args", "env", "named"), INVALID_SETTINGS)
def test_invalid_setting_exits_non_zero_with_one_line_and_no_traceback(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    # The data dir lies under a plain file: were a setting wrongly accepted, the server
    # would fail at mkdir, before it could start a Redis or listen anywhere.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result = run_cli(
        *args, "--data-dir", str(blocker / "data"), env=clean_environ(**env)
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    # argparse may print its usage synopsis first; the error itself is one line.
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith(("usage:", " "))]
    assert len(errors) == 1, result.stderr
    assert named in errors[0] and errors[0] == lines[-1]


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"]])
def test_help_shows_every_option_with_its_default_and_env_name(args: list[str]) -> None:
    result = run_cli(*args, env=clean_environ(COLUMNS="2000"))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    options_part = text[text.index("options:") :]
    # "--name VALUE" for valued options, "--name, --no-name" for yes/no ones
    starts = {}
    for option, *_ in OPTIONS:
        found = re.search(rf"(?<![\w-])--{re.escape(option)}[ ,]", options_part)
        assert found is not None, option
        starts[option] = found.start()
    for option, *_ in OPTIONS:
        start = starts[option]
        end = min([p for p in starts.values() if p > start], default=None)
        described = options_part[start:end]
        assert f"env {env_name(option)};" in described, described
        assert f"default: {default_text(option)}]" in described, described


def test_help_names_the_endpoints_and_signals_beside_the_options() -> None:
    result = run_cli("--help", env=clean_environ(COLUMNS="2000"))
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for named in ("GET /health", "GET /ready", "GET /metrics", "SIGTERM", "SIGHUP"):
        assert named in text, named


def test_readme_settings_table_names_every_option_and_no_other() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `--([a-z-]+)` \|", readme, re.MULTILINE)
    assert sorted(rows) == sorted(option for option, *_ in OPTIONS)


def test_gone_status_is_404_by_default_and_410_from_flag_or_environment() -> None:
    assert build_settings({}, {}).gone_status == 404
    assert build_settings({}, {"TUS_GONE_STATUS": "410"}).gone_status == 410
    assert build_settings({"gone_status": 410}, {"TUS_GONE_STATUS": "404"}).gone_status == 410


def test_python_dash_m_tusserver_help_works() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tusserver", "--help"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=clean_environ(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage: tusserver" in result.stdout
    assert "--max-size" in result.stdout


def test_token_command_prints_a_token_verify_token_accepts() -> None:
    result = run_cli(
        "token", "--subject", "alice", "--actions", "create,upload", "--max-size", "10GB",
        "--ttl", "15m", "--secret", "s3cret",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1
    token = lines[0]
    grant = verify_token(token, ["s3cret"])
    assert grant.subject == "alice"
    assert grant.actions == frozenset({"create", "upload"})
    assert grant.max_size_bytes == 10 * 10**9
    assert grant.upload_id is None
    now = time.time()
    verify_token(token, ["s3cret"], now=now + 14 * 60)  # still valid near the end of 15m
    with pytest.raises(Unauthorized, match="expired"):
        verify_token(token, ["s3cret"], now=now + 15 * 60 + DEFAULT_LEEWAY_S + 2)
    with pytest.raises(Unauthorized, match="signature"):
        verify_token(token, ["another secret"])


def test_token_command_with_finish_issues_the_fin_claim() -> None:
    args = ("token", "--subject", "alice", "--ttl", "15m", "--secret", "s3cret")
    finishing = run_cli(*args, "--finish")
    plain = run_cli(*args)
    assert finishing.returncode == 0 and plain.returncode == 0, finishing.stderr
    assert verify_token(finishing.stdout.strip(), ["s3cret"]).finishes
    assert not verify_token(plain.stdout.strip(), ["s3cret"]).finishes


# -- the access log ------------------------------------------------------------------------


async def test_access_log_never_shows_the_query_string(
    processes: StartProcess, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    server = processes(tmp_path / "data")
    upload_id = upload_id_of(await create_upload(http, server.url, 10))
    async with http.head(server.url + upload_id + "?token=secret123", headers=TUS) as response:
        assert response.status == 200
    async with http.get(server.url + "?token=secret123&x=1", headers=TUS) as response:
        await response.read()

    async def head_is_logged() -> bool:
        return f"HEAD /files/{upload_id} 200" in server.log()

    await wait_until(head_is_logged)
    assert "secret123" not in server.log()
    assert "token=" not in server.log()


def test_startup_objects_are_frozen_garbage_is_not_and_passes_are_fewer() -> None:
    """A serving process leaves what it made at startup out of the collector's passes
    (`tune_collector`, called once it listens), after collecting the garbage: a
    cycle nobody holds is freed, not frozen for the life of the process."""
    script = """
import gc, weakref
from tusserver.server.memory import tune_collector

class Node:
    pass

kept = Node()
cycle = Node()
cycle.self = cycle
dropped = weakref.ref(cycle)
del cycle
gc.disable()  # only tune_collector may collect
tune_collector()
assert dropped() is None, "the garbage cycle was frozen"
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
assert not any(obj is kept for generation in range(3) for obj in gc.get_objects(generation))
assert gc.get_threshold()[0] == 20_000, gc.get_threshold()  # fewer passes from here on
print("ok")
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "ok", result.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim, RSS from /proc")
def test_free_pages_between_chunks_in_use_go_back_to_the_kernel() -> None:
    """With the thresholds a server sets (`tune_malloc`), memory freed between chunks still
    in use stays resident: bodies' chunks freed in another order than they came leave such
    holes. `release_free_pages` hands their pages back."""
    script = """
import sys
from tusserver.server.memory import release_free_pages, tune_malloc

def rss_mib():
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

if not tune_malloc():
    sys.exit("not glibc")
chunks, pins = [], []
for _ in range(400):  # 100 MiB of 256 KiB chunks, each followed by a small object kept
    chunks.append(b"x" * (256 * 1024))
    pins.append(bytes(range(200)) * 4)
del chunks  # the holes between the pins: free, but kept by the heap
held = rss_mib()
assert release_free_pages()
print(round(held), round(rss_mib()))
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    held, released = map(int, result.stdout.split())
    assert held - released >= 60, (held, released)  # of the 100 MiB freed
