"""The supervisor: starts the embedded Valkey (unless --redis-url), binds the listening socket,
checks Redis, then serves in-process or forks --workers processes on that socket. Workers never
start a Redis. If the embedded server dies, the supervisor says so and exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

from aiohttp import web
from redis.exceptions import RedisError

from tusserver.http.access_log import AccessLogger, JsonAccessLogger
from tusserver.http.app import build_app, make_runner, start_draining
from tusserver.http.metrics import MULTIPROC_DIR_VARIABLE
from tusserver.server import logs
from tusserver.server.memory import release_free_pages_forever, tune_collector, tune_malloc
from tusserver.settings import Settings
from tusserver.store.client import check_layout
from tusserver.store.client import connect as connect_redis
from tusserver.store.embedded import EmbeddedRedis, EmbeddedRedisError
from tusserver.tasks import cancel_and_wait

log = logging.getLogger("tusserver")
SHUTDOWN_TIMEOUT_S = 10.0
# Connections the kernel queues before a worker accepts them: thousands of phones may connect
# within a second (the kernel caps it at net.core.somaxconn, 4096 on current Linux).
LISTEN_BACKLOG = 4096
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Blocked from the announcement of the address until a process has its handlers: a stop
# waits instead of killing a worker still starting, and a SIGHUP (TLS reload, or nothing)
# instead of taking its default action, which ends the process.
HANDLED_SIGNALS = (*STOP_SIGNALS, signal.SIGHUP)


def _bind_unix(path: Path) -> list[socket.socket]:
    """One unix socket at `path` (a stale socket file left there is replaced), shared by the
    workers."""
    if path.is_socket():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(LISTEN_BACKLOG)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return [sock]


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server's TLS context for --tls-cert and --tls-key, or None for plain HTTP.
    Raises OSError or ssl.SSLError for files it cannot use."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


def _reload_tls(settings: Settings, context: ssl.SSLContext) -> None:
    """(SIGHUP) New connections get the certificate now in the files; open ones keep theirs.
    A pair that cannot be loaded is logged and the old one kept."""
    if settings.tls_cert is None or settings.tls_key is None:
        return
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as error:
        log.error("TLS certificate not reloaded, keeping the old one: %s", error)
        return
    log.info("TLS certificate reloaded from %s", settings.tls_cert)


def _hangup(settings: Settings, context: ssl.SSLContext | None) -> None:
    if context is None:
        log.info("SIGHUP: no TLS certificate to reload")
        return
    _reload_tls(settings, context)


def _bind(settings: Settings) -> list[socket.socket]:
    """The listening sockets: one, or with --workers on Linux one per worker on the same port
    (SO_REUSEPORT), so the kernel spreads new connections evenly over the workers. (Workers
    sharing one socket do not share the work: whichever wakes first accepts every connection
    that is waiting; measured in benchmarks/README.md.)"""
    if settings.unix_socket is not None:
        return _bind_unix(settings.unix_socket)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    one_each = settings.workers > 1 and sys.platform == "linux"
    port = settings.port
    if one_each:  # a plain bind first: fail if the port is taken, never join another group
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((settings.host, port))
            port = probe.getsockname()[1]
    sockets: list[socket.socket] = []
    try:
        for _ in range(settings.workers if one_each else 1):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if one_each:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((settings.host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def serve(settings: Settings) -> int:
    """Run the supervisor until SIGINT/SIGTERM; the exit code."""
    logs.setup(json_lines=settings.log_json, stream=sys.stderr)
    embedded: EmbeddedRedis | None = None
    redis_url = settings.redis_url
    try:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if redis_url is None:
            # With --fsync always or complete, Valkey fsyncs nothing itself: the serving
            # processes sync its AOF for the steps that need it (store/aof.py).
            syncs_aof = settings.fsync != "never"
            embedded = EmbeddedRedis(
                settings.data_dir, appendfsync="no" if syncs_aof else "everysec"
            )
            redis_url = embedded.start()
            if syncs_aof:
                settings = dataclasses.replace(settings, own_aof_dir=embedded.aof_dir)
        tls_context(settings)  # a certificate that cannot be used stops the start here
        sockets = _bind(settings)
    except (EmbeddedRedisError, OSError, ssl.SSLError) as error:
        print(f"tusserver: {error}", file=sys.stderr)
        if embedded is not None:
            embedded.stop()
        return 1
    failure = asyncio.run(_check_redis(redis_url))
    if failure is not None:
        print(f"tusserver: {failure}", file=sys.stderr)
        for sock in sockets:
            sock.close()
        if embedded is not None:
            embedded.stop()
        return 1
    if not settings.is_secured:
        log.warning(
            "development mode: no secret is set, so requests need no token and uploads "
            "belong to 'anonymous'; set TUS_SECRET for real use"
        )
    # From here on a SIGTERM stops gracefully: until the process that serves (or each forked
    # worker) has its handlers, the signal waits, blocked, instead of killing it (a worker
    # killed so would leave its socket, which the supervisor holds too, taking connections
    # that nobody accepts).
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    print(f"tusserver listening on {_listening_on(settings, sockets[0])}", flush=True)
    try:
        if settings.workers == 1:
            return asyncio.run(_serve_worker(settings, redis_url, sockets[0], embedded))
        return _supervise_workers(settings, redis_url, sockets, embedded)
    finally:
        for sock in sockets:
            sock.close()
        if settings.unix_socket is not None and settings.unix_socket.is_socket():
            settings.unix_socket.unlink()
        if embedded is not None:
            embedded.stop()


def _listening_on(settings: Settings, sock: socket.socket) -> str:
    """What the start line announces: the endpoint's URL, or the unix socket's path."""
    if settings.unix_socket is not None:
        return f"unix:{settings.unix_socket} (endpoint {settings.base_path})"
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    scheme = "https" if settings.tls_cert is not None else "http"
    return f"{scheme}://{shown_host}:{port}{settings.base_path}"


async def _check_redis(redis_url: str) -> str | None:
    """Why the Redis at `redis_url` cannot hold our state (unreachable, another shard
    layout, evicting keys), in one line; None if it can."""
    try:
        client = await connect_redis(redis_url)
    except (RedisError, OSError) as error:
        return f"cannot reach Redis at {_without_password(redis_url)}: {error}"
    try:
        await check_layout(client)
    except (RedisError, OSError, RuntimeError) as error:
        return f"Redis at {_without_password(redis_url)}: {error}"
    finally:
        await client.aclose()
    return None


def _without_password(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


async def _serve_worker(
    settings: Settings,
    redis_url: str,
    sock: socket.socket,
    embedded: EmbeddedRedis | None,
    supervisor_pid: int | None = None,
) -> int:
    """Serve on `sock` until told to stop; 1 if the embedded Redis died meanwhile, or (a
    forked worker, given its `supervisor_pid`) if the supervisor is gone: a killed supervisor
    must not leave workers serving without it."""
    tune_malloc()
    app = build_app(settings, redis_url)
    access_log_class = JsonAccessLogger if settings.log_json else AccessLogger
    runner = make_runner(app, access_log_class, SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    context = tls_context(settings)
    # asyncio listens again with the site's backlog (aiohttp's default: 128): keep ours
    site = web.SockSite(runner, sock, ssl_context=context, backlog=LISTEN_BACKLOG)
    await site.start()
    tune_collector()
    releasing = asyncio.create_task(release_free_pages_forever())
    stop = asyncio.Event()
    hurry = asyncio.Event()  # a second SIGTERM: end the drain delay now

    def stop_asked() -> None:
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop_asked)
    # SIGHUP reloads the TLS pair; without TLS it changes nothing (it must not end the
    # process, as its default action would: log rotation sends it, and the supervisor
    # passes it on to every worker)
    loop.add_signal_handler(signal.SIGHUP, _hangup, settings, context)
    # blocked since `serve` announced the address: one sent meanwhile is delivered now
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
    exit_code = 0
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            if embedded is not None and not embedded.is_running():
                log.error("the embedded Redis server stopped unexpectedly; shutting down")
                exit_code = 1
                break
            if supervisor_pid is not None and os.getppid() != supervisor_pid:
                log.error("the supervisor (pid %d) is gone; shutting down", supervisor_pid)
                exit_code = 1
                break
    finally:
        start_draining(app)
        if stop.is_set():
            await _drain(settings.drain_delay_s, hurry, supervisor_pid)
        await runner.cleanup()
        await cancel_and_wait(releasing)
    return exit_code


async def _drain(delay_s: float, hurry: asyncio.Event, supervisor_pid: int | None) -> None:
    """Keep serving (while /ready answers 503) for `delay_s`, so a load balancer that polls
    /ready stops sending before the listener closes; less if `hurry` is set or (a forked
    worker) the supervisor is gone."""
    if delay_s <= 0:
        return
    log.info(
        "draining: /ready answers 503; the listener closes in %gs (a second SIGTERM closes "
        "it now)", delay_s,
    )  # fmt: skip
    deadline = time.monotonic() + delay_s
    while (left := deadline - time.monotonic()) > 0 and not hurry.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), min(left, 0.5))
        if supervisor_pid is not None and os.getppid() != supervisor_pid:
            log.error("the supervisor (pid %d) is gone; stopping now", supervisor_pid)
            return


def _prepare_metrics_dir(settings: Settings) -> None:
    """Before the first fork (and before anything imports prometheus-client): the folder
    where every worker writes its metrics, so a scrape of any worker sums them all. Emptied
    at start: the files of a previous run would be counted again."""
    folder = os.environ.get(MULTIPROC_DIR_VARIABLE) or str(settings.data_dir / "metrics")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.environ[MULTIPROC_DIR_VARIABLE] = folder


def _forget_metrics_of(pid: int) -> None:
    """A worker is gone: its open-connection gauge must no longer count (its counters stay
    in the sums)."""
    if os.environ.get(MULTIPROC_DIR_VARIABLE):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def _supervise_workers(
    settings: Settings, redis_url: str, sockets: list[socket.socket], embedded: EmbeddedRedis | None
) -> int:
    """Fork the workers (worker i serves socket i, or all share the one socket), then wait;
    when one exits unasked, stop the others and return 1."""
    if settings.metrics:
        _prepare_metrics_dir(settings)
    children: list[int] = []
    socket_of: dict[int, socket.socket] = {}
    supervisor = os.getpid()
    for index in range(settings.workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve, never start a Redis
            code = 1
            try:
                own = sockets[index % len(sockets)]
                for sock in sockets:
                    if sock is not own:
                        sock.close()
                code = asyncio.run(_serve_worker(settings, redis_url, own, None, supervisor))
            finally:
                logging.shutdown()  # the lines still waiting for their loop turn's end
                os._exit(code)
        children.append(pid)
        if len(sockets) > 1:  # its own socket (SO_REUSEPORT): it goes when the worker goes
            socket_of[pid] = sockets[index]
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)

    def forward_hangup(_signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGHUP)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward_hangup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)  # blocked since `serve` said so
    exit_code = 0
    alive = set(children)
    while alive:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid:
            alive.discard(pid)
            _forget_metrics_of(pid)
            if pid in socket_of:  # the kernel must not queue connections for a dead worker
                socket_of.pop(pid).close()
            if not stopping:
                log.error("worker %d exited (status %d); shutting down", pid, status)
                exit_code = 1
                forward(signal.SIGTERM, None)
            continue
        if embedded is not None and not embedded.is_running() and not stopping:
            log.error("the embedded Redis server stopped unexpectedly; shutting down")
            exit_code = 1
            forward(signal.SIGTERM, None)
        time.sleep(0.2)
    return exit_code
