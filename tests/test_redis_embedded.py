"""The embedded Valkey server: real processes on real files, no mocks."""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import redis

from tests.support.processes import kill_quietly, pid_is_gone
from tests.support.waiting import wait_until_sync
from tusserver.store.embedded import EmbeddedRedis, EmbeddedRedisError, find_server_binary

REPO_ROOT = Path(__file__).resolve().parents[1]
DEADLINE_S = 15.0


def socket_path(url: str) -> str:
    return unquote(urlparse(url).path)


@pytest.fixture
def make_server() -> Iterator[Callable[..., EmbeddedRedis]]:
    """Build EmbeddedRedis instances that are all stopped (or killed) at teardown."""
    servers: list[EmbeddedRedis] = []

    def make(data_dir: Path, **kwargs: str) -> EmbeddedRedis:
        server = EmbeddedRedis(data_dir, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        pid = server.pid
        server.stop(timeout_s=5.0)
        kill_quietly(pid)


def test_find_server_binary_returns_an_executable() -> None:
    binary = find_server_binary()
    assert binary.is_file()
    assert os.access(binary, os.X_OK)


def test_key_survives_restart_and_files_are_private(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    server = make_server(tmp_path / "data")
    url = server.start()
    assert url.startswith("unix://")
    redis_dir = tmp_path / "data" / "redis"
    assert stat.S_IMODE(redis_dir.stat().st_mode) == 0o700
    sock = Path(socket_path(url))
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700
    with redis.Redis.from_url(url) as client:
        client.set("survivor", b"still here")
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("port") == {"port": "0"}
    first_pid = server.pid
    server.stop()
    assert first_pid is not None
    wait_until_sync(lambda: pid_is_gone(first_pid), DEADLINE_S)
    assert not server.is_running()

    url = server.start()
    assert server.pid != first_pid
    with redis.Redis.from_url(url) as client:
        assert client.get("survivor") == b"still here"


def test_appendfsync_setting_reaches_the_server(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    url = make_server(tmp_path, appendfsync="always").start()
    with redis.Redis.from_url(url) as client:
        assert client.config_get("appendfsync") == {"appendfsync": "always"}


def test_second_owner_of_a_data_dir_is_refused(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    make_server(tmp_path).start()
    second = make_server(tmp_path)
    with pytest.raises(EmbeddedRedisError, match="already") as caught:
        second.start()
    assert f"pid {os.getpid()}" in str(caught.value)
    assert second.pid is None


def test_lock_is_released_by_stop(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    first = make_server(tmp_path)
    first.start()
    first.stop()
    second = make_server(tmp_path)
    second.start()
    assert second.is_running()


ORPHAN_PARENT = """
import sys, time
from pathlib import Path
import redis
from tusserver.store.embedded import EmbeddedRedis
server = EmbeddedRedis(Path(sys.argv[1]))
with redis.Redis.from_url(server.start()) as client:
    client.set("orphan-key", b"kept")
print(server.pid, flush=True)
time.sleep(120)
"""


def test_orphaned_server_is_adopted_and_stopped(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with (tmp_path / "parent.err").open("wb") as stderr:
        parent = subprocess.Popen(
            [sys.executable, "-c", ORPHAN_PARENT, str(tmp_path / "data")],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    orphan_pid: int | None = None
    try:
        assert parent.stdout is not None
        ready, _, _ = select.select([parent.stdout], [], [], DEADLINE_S)
        assert ready, (tmp_path / "parent.err").read_text()
        orphan_pid = int(parent.stdout.readline())
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=DEADLINE_S)
        assert not pid_is_gone(orphan_pid)

        server = make_server(tmp_path / "data")
        url = server.start()
        assert server.pid == orphan_pid
        assert server.is_running()
        with redis.Redis.from_url(url) as client:
            assert client.get("orphan-key") == b"kept"
        server.stop()
        wait_until_sync(lambda: pid_is_gone(orphan_pid), DEADLINE_S)
        assert not server.is_running()
    finally:
        kill_quietly(parent.pid)
        parent.wait(timeout=DEADLINE_S)
        if parent.stdout is not None:
            parent.stdout.close()
        kill_quietly(orphan_pid)


def test_stale_pidfile_of_a_dead_process_is_ignored(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=DEADLINE_S)
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    (redis_dir / "valkey.pid").write_text(f"{dead.pid}\n")
    server = make_server(tmp_path)
    server.start()
    assert server.pid != dead.pid
    assert server.is_running()


def test_live_server_that_does_not_answer_is_refused(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    stranger = subprocess.Popen(
        [str(find_server_binary()), "--port", "0", "--unixsocket", "other.sock", "--save", ""],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_sync(lambda: (tmp_path / "other.sock").exists(), DEADLINE_S)
        redis_dir = tmp_path / "data" / "redis"
        redis_dir.mkdir(parents=True)
        (redis_dir / "valkey.pid").write_text(f"{stranger.pid}\n")
        server = make_server(tmp_path / "data")
        with pytest.raises(EmbeddedRedisError, match="does not answer"):
            server.start()
        assert server.pid is None
        assert stranger.poll() is None  # someone else's server is left alone
    finally:
        stranger.kill()
        stranger.wait(timeout=DEADLINE_S)


def test_very_long_data_dir_works_through_a_short_symlink(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    data_dir = tmp_path
    while len(str(data_dir)) < 200:
        data_dir = data_dir / ("deep" * 10)
    server = make_server(data_dir)
    url = server.start()
    client_path = Path(socket_path(url))
    assert len(str(client_path)) < 100
    assert client_path.is_symlink()
    assert client_path.resolve() == (data_dir / "redis" / "valkey.sock").resolve()
    with redis.Redis.from_url(url) as client:
        assert client.ping() is True
    server.stop()
    assert not client_path.parent.exists()


def test_killed_server_is_not_running(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    server = make_server(tmp_path)
    server.start()
    assert server.is_running()
    assert server.pid is not None
    os.kill(server.pid, signal.SIGKILL)
    wait_until_sync(lambda: not server.is_running(), DEADLINE_S)
    server.stop()
    assert server.pid is None


def test_server_that_exits_at_start_is_reported_with_its_log(
    tmp_path: Path, make_server: Callable[..., EmbeddedRedis]
) -> None:
    server = make_server(tmp_path)
    with redis.Redis.from_url(server.start()) as client:
        client.set("key", b"value")
    server.stop()
    aof = sorted((tmp_path / "redis" / "appendonlydir").glob("*.incr.aof"))[-1]
    content = aof.read_bytes()
    aof.write_bytes(content[:20] + b"not a command\r\n" + content[20:])

    with pytest.raises(EmbeddedRedisError, match="exited with code") as caught:
        server.start()
    assert "append only file" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert server.pid is None
    # The failed start let go of the data dir: the next attempt fails the same way, not "already".
    with pytest.raises(EmbeddedRedisError, match="exited with code"):
        make_server(tmp_path).start()
