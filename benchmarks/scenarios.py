"""The scenarios, each run against one target at a time.

A server target is started fresh for each scenario with its own data directory, sampled
from /proc while the load runs, stopped, and its files deleted. The raw target writes the
same bytes (or files) straight to the same disk from a thread: the physical limit.

    a  one upload in a single PATCH                      (MB/s)
    b  the same bytes in PATCHes of --patch-bytes        (MB/s, PATCH p50/p99)
    c  --concurrent-uploads uploads at once, one PATCH each, --workers 2 (MB/s)
    d  --small-count uploads by creation-with-upload     (uploads/s, POST p50/p99)
    e  one long upload with RSS sampled throughout       (MB/s, peak RSS, RSS slope)
    f  HEAD+PATCH pairs of a probe upload during c, c's load kept up after its batch
       until the probe has --latency-pairs pairs               (p50/p99)
    g  a's upload as one file part of a multipart form   (MB/s, and as a ratio to a)
       (tusserver and the raw write only: the baselines take no forms)
    h  --slow-uploads uploads at once, each a PATCH whose body arrives at --slow-rate for
       --slow-seconds (phones on a bad network), one server process; a probe beside them
       (HEAD p50/p99 on a new connection, HEAD+PATCH p50/p99, failures, RSS of the tree)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import resource
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import client, procstat, servers
from benchmarks.servers import Target

HASH_BLOCK = client.BLOCK * 4
RAW_WRITE_BYTES = 64 * 2**10  # the fastest write size on the machine of the README
SWEEP_WRITE_SIZES = (64 * 2**10, 256 * 2**10, 2**20, 4 * 2**20)
PROBE_READY_TIMEOUT_S = 60.0
SLOWEST_HEADS_KEPT = 10  # h: the slowest HEADs kept in the result, with when they were sent
SLOW_PROBE_INTERVAL_S = 0.05  # h's probe pauses between pairs: a probe, not another load
SLOW_PROBE_PAIR_TIMEOUT_S = 30.0
SLOW_GRACE_S = 60.0  # h waits this long past its schedule before it gives up on an upload


@dataclass(frozen=True)
class Sizes:
    single_bytes: int = 2 * 2**30
    patch_bytes: int = 8 * 2**20
    concurrent_uploads: int = 32
    concurrent_bytes: int = 64 * 2**20
    concurrent_workers: int = 2
    small_count: int = 2000
    small_bytes: int = 1024
    small_concurrency: int = 16
    soak_bytes: int = 10 * 2**30
    probe_patch_bytes: int = 4096
    # f: the probe's pairs, c's load kept up until it has them. Nearest-rank p99 of fewer
    # than 101 values is the slowest one; of 300 it is the fourth slowest.
    latency_pairs: int = 300
    slow_uploads: int = 2000
    slow_rate: int = 1024  # bytes per second of each slow upload
    slow_seconds: int = 20
    slow_ramp_s: float = 1.0  # the slow uploads start evenly spread over this window


QUICK_SIZES = Sizes(
    single_bytes=256 * 2**20,
    concurrent_uploads=8,
    concurrent_bytes=16 * 2**20,
    small_count=200,
    soak_bytes=1 * 2**30,
    slow_uploads=200,
    slow_seconds=10,
    latency_pairs=60,
)


ALL_KINDS = ("raw", "tusserver", "bare", "node", "tuspy")
SERVER_KINDS = ("tusserver", "bare", "node", "tuspy")


@dataclass(frozen=True)
class Scenario:
    key: str
    name: str
    title: str
    metric: str  # the figure ratios are taken of: mb_per_s, uploads_per_s or p99_ms (h: of
    # the HEADs alone)
    target_kinds: tuple[str, ...] = ALL_KINDS  # the targets that can take this load

    def takes(self, target: Target) -> bool:
        return target.kind in self.target_kinds


SCENARIOS = {
    s.key: s
    for s in (
        Scenario("a", "a_single_patch", "one upload, single PATCH", "mb_per_s"),
        Scenario("b", "b_chunked_patches", "one upload, PATCHes of {patch}", "mb_per_s"),
        Scenario("c", "c_concurrent", "{n} concurrent uploads of {each}", "mb_per_s"),
        Scenario("d", "d_small_uploads", "{n} uploads of {small}, creation-with-upload",
                 "uploads_per_s"),
        Scenario("e", "e_soak", "one upload of {soak}, RSS sampled", "mb_per_s"),
        Scenario("f", "f_latency_under_c", "HEAD+PATCH pair latency during c", "p99_ms"),
        Scenario("g", "g_form_upload", "one upload of {single}, one multipart/form-data POST",
                 "mb_per_s", ("raw", "tusserver")),
        Scenario("h", "h_slow_clients", "{slow} uploads at {rate}/s for {seconds} s, one "
                 "process: a new HEAD", "p99_ms", SERVER_KINDS),
    )
}  # fmt: skip


@dataclass
class Result:
    """One target in one scenario: what the client saw and what the server spent."""

    scenario: str
    target: str
    label: str
    bytes: int = 0
    uploads: int = 0
    elapsed_s: float = 0.0
    mb_per_s: float | None = None
    uploads_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    samples: int | None = None
    cpu_s: float | None = None
    cpu_s_per_gb: float | None = None  # cpu_s over the 10^9 bytes the scenario moved
    cpu_pressure_pct: float | None = None  # wall time in which some task waited for a CPU
    peak_rss_mib: float | None = None
    peak_rss_sum_mib: float | None = None
    rss_slope_mib_per_gib: float | None = None
    rss_by_process_mib: dict[str, float] | None = None
    cpu_by_process_s: dict[str, float] | None = None
    workers: int | None = None
    # h: p50_ms/p99_ms are the probe's HEADs alone (on a new connection), these its pairs
    pair_p50_ms: float | None = None
    pair_p99_ms: float | None = None
    failed: int | None = None  # h: uploads that did not end with a 204, and why
    failures: dict[str, int] | None = None
    created_within_s: float | None = None  # h: from the first POST to the last 201
    created_p99_ms: float | None = None  # h: HEAD p99 once every upload was created
    # h: the slowest HEADs, (seconds after the first POST, ms), slowest first: which burst
    # (the creations, the completions) the tail falls in
    slowest_heads: list[tuple[float, float]] | None = None
    runs: int = 1
    run_values: list[float] | None = None  # the scenario's metric in each run that succeeded
    ratios: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {"kind": "result", **asdict(self)}

    def metric(self, name: str) -> float | None:
        value = getattr(self, name)
        return None if self.error is not None else value

    def add_usage(self, usage: procstat.Usage) -> None:
        if self.cpu_s is None:  # c sets its own at the end of its batch (`Context.cost_so_far`)
            self.cpu_s = usage.cpu_s
            self.cpu_by_process_s = usage.cpu_by_process_s
        self.peak_rss_mib = usage.peak_rss_mib
        self.peak_rss_sum_mib = usage.peak_rss_sum_mib
        self.rss_by_process_mib = usage.rss_by_process_mib
        if self.scenario == SCENARIOS["e"].name:
            self.rss_slope_mib_per_gib = usage.rss_slope_mib_per_gib

    def add_cpu_per_gb(self) -> None:
        """CPU-seconds per 10^9 bytes moved, from `cpu_s` and `bytes` (none without bytes)."""
        if self.cpu_s is not None and self.bytes > 0:
            self.cpu_s_per_gb = round(self.cpu_s / (self.bytes / 1e9), 2)


def combine(runs: list[Result], metric: str) -> Result:
    """Several runs of one target in one scenario as one row: the run with the median
    `metric` (the lower middle one of an even count), with the peak RSS and the steepest
    RSS slope of all runs. A row with `error` only if every run failed."""
    succeeded = [r for r in runs if r.error is None and r.metric(metric) is not None]
    if not succeeded:
        return replace(runs[-1], runs=len(runs))
    ordered = sorted(succeeded, key=lambda r: r.metric(metric) or 0.0)
    chosen = replace(ordered[(len(ordered) - 1) // 2], runs=len(runs))
    chosen.run_values = [r.metric(metric) or 0.0 for r in succeeded]
    peaks = [r.peak_rss_mib for r in succeeded if r.peak_rss_mib is not None]
    chosen.peak_rss_mib = max(peaks) if peaks else None
    sums = [r.peak_rss_sum_mib for r in succeeded if r.peak_rss_sum_mib is not None]
    chosen.peak_rss_sum_mib = max(sums) if sums else None
    slopes = [r.rss_slope_mib_per_gib for r in succeeded if r.rss_slope_mib_per_gib is not None]
    chosen.rss_slope_mib_per_gib = max(slopes) if slopes else None
    return chosen


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(fraction * len(ordered) + 0.5)))
    return round(ordered[rank - 1], 3)


def _throughput(result: Result, total_bytes: int, uploads: int, elapsed_s: float) -> None:
    result.bytes, result.uploads, result.elapsed_s = total_bytes, uploads, round(elapsed_s, 3)
    result.mb_per_s = round(total_bytes / elapsed_s / 1e6, 1)
    result.uploads_per_s = round(uploads / elapsed_s, 1)


def _latencies(result: Result, latencies_ms: list[float]) -> None:
    result.p50_ms = percentile(latencies_ms, 0.50)
    result.p99_ms = percentile(latencies_ms, 0.99)
    result.samples = len(latencies_ms)


# -- the loads against a server ------------------------------------------------------------


@dataclass
class Context:
    """What a load needs: sizes, the endpoint, the client's byte counter."""

    sizes: Sizes
    endpoint: str
    progress: client.Progress
    repo_root: Path
    # puts the server's CPU seconds and the CPU pressure from the load's start until now
    # into a result (a load whose figure ends before the load does)
    cost_so_far: Callable[[Result], None] | None = None


Load = Callable[[Context, Result], Awaitable[list[Result]]]


async def load_single(ctx: Context, result: Result) -> list[Result]:
    return await _one_body(ctx, result, client.upload)


async def _one_body(
    ctx: Context,
    result: Result,
    send: Callable[[aiohttp.ClientSession, str, int, client.Progress], Awaitable[str]],
) -> list[Result]:
    """a's bytes sent in one request by `send` (a PATCH, or a form's file part), timed."""
    size = ctx.sizes.single_bytes
    async with client.session() as http:
        started = time.perf_counter()
        await send(http, ctx.endpoint, size, ctx.progress)
        _throughput(result, size, 1, time.perf_counter() - started)
    return [result]


async def load_chunked(ctx: Context, result: Result) -> list[Result]:
    size, step = ctx.sizes.single_bytes, ctx.sizes.patch_bytes
    latencies: list[float] = []
    async with client.session() as http:
        started = time.perf_counter()
        url, offset = await client.create(http, ctx.endpoint, size, ctx.progress)
        while offset < size:
            sent = time.perf_counter()
            offset = await client.patch(http, url, offset, min(step, size - offset), ctx.progress)
            latencies.append((time.perf_counter() - sent) * 1000)
        _throughput(result, size, 1, time.perf_counter() - started)
    _latencies(result, latencies)
    return [result]


async def load_concurrent(ctx: Context, result: Result) -> list[Result]:
    """Scenario c, with the latency probe of scenario f beside it. c's figure is its batch of
    uploads; then the same load goes on (each of the `concurrent_uploads` slots uploading
    again, and deleting what it uploaded) until the probe has its `latency_pairs` pairs: a
    batch alone lasts a few seconds, and gave the probe 30-90 pairs, too few for a p99."""
    count, each = ctx.sizes.concurrent_uploads, ctx.sizes.concurrent_bytes
    latency = Result(SCENARIOS["f"].name, result.target, result.label, workers=result.workers)
    probe = await _start_probe(ctx, "--max-pairs", str(ctx.sizes.latency_pairs))
    try:
        async with client.session() as http:
            started = time.perf_counter()
            await asyncio.gather(
                *(client.upload(http, ctx.endpoint, each, ctx.progress) for _ in range(count))
            )
            _throughput(result, count * each, count, time.perf_counter() - started)
            if ctx.cost_so_far is not None:
                ctx.cost_so_far(result)
            probe_done = asyncio.ensure_future(probe.wait())
            kept_up = await _keep_uploading(http, ctx, count, each, until=probe_done)
        measured = await _stop_probe(probe)
    finally:
        await _end_probe(probe)
    _latencies(latency, measured["latencies_ms"])
    latency.elapsed_s = round(time.perf_counter() - started, 3)
    latency.uploads, latency.bytes = count + kept_up, (count + kept_up) * each
    return [result, latency]


async def _keep_uploading(
    http: aiohttp.ClientSession, ctx: Context, count: int, each: int, until: asyncio.Future[Any]
) -> int:
    """`count` uploads of `each` bytes at a time, one after another in each slot, every one
    deleted once complete (the disk then holds at most `count` of them), until `until` is
    done; the uploads completed. A slot ends the upload it has begun."""

    async def slot() -> int:
        done = 0
        while not until.done():
            url = await client.upload(http, ctx.endpoint, each, ctx.progress)
            await client.delete(http, url)
            done += 1
        return done

    return sum(await asyncio.gather(*(slot() for _ in range(count))))


async def load_small(ctx: Context, result: Result) -> list[Result]:
    count, size = ctx.sizes.small_count, ctx.sizes.small_bytes
    gate = asyncio.Semaphore(ctx.sizes.small_concurrency)
    latencies: list[float] = []

    async def one(http: aiohttp.ClientSession) -> None:
        async with gate:
            sent = time.perf_counter()
            _url, offset = await client.create(http, ctx.endpoint, size, ctx.progress, True)
            latencies.append((time.perf_counter() - sent) * 1000)
        if offset != size:
            raise client.LoadError(f"creation-with-upload kept {offset} of {size} bytes")

    async with client.session() as http:
        started = time.perf_counter()
        await asyncio.gather(*(one(http) for _ in range(count)))
        _throughput(result, count * size, count, time.perf_counter() - started)
    _latencies(result, latencies)
    return [result]


async def load_soak(ctx: Context, result: Result) -> list[Result]:
    size = ctx.sizes.soak_bytes
    async with client.session() as http:
        started = time.perf_counter()
        await client.upload(http, ctx.endpoint, size, ctx.progress)
        _throughput(result, size, 1, time.perf_counter() - started)
    return [result]


async def load_form(ctx: Context, result: Result) -> list[Result]:
    """a's bytes as one file part of a form (`curl -F`): the same size, so `g / a` is what
    the multipart parsing and the part's flow-controlled stream cost."""
    return await _one_body(ctx, result, client.form_upload)


async def _start_probe(ctx: Context, *options: str) -> asyncio.subprocess.Process:
    """The latency probe (benchmarks/probe.py) on an upload of its own, once it is ready."""
    probe = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.probe", ctx.endpoint,
        "--patch-bytes", str(ctx.sizes.probe_patch_bytes), *options,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, cwd=ctx.repo_root,
    )  # fmt: skip
    assert probe.stdout is not None
    try:
        ready = await asyncio.wait_for(probe.stdout.readline(), PROBE_READY_TIMEOUT_S)
        if ready.strip() != b"ready":
            raise client.LoadError(f"the latency probe did not start: {ready!r}")
    except BaseException:
        await _end_probe(probe)
        raise
    return probe


async def _stop_probe(probe: asyncio.subprocess.Process) -> dict[str, Any]:
    """SIGTERM the probe; what it measured."""
    assert probe.stdout is not None
    if probe.returncode is None:  # it may have stopped by itself (--max-pairs)
        with contextlib.suppress(ProcessLookupError):
            probe.send_signal(signal.SIGTERM)
    output = await asyncio.wait_for(probe.stdout.read(), PROBE_READY_TIMEOUT_S)
    if await probe.wait() != 0:
        raise client.LoadError("the latency probe failed")
    found: dict[str, Any] = json.loads(output.decode().strip().splitlines()[-1])
    return found


async def _end_probe(probe: asyncio.subprocess.Process) -> None:
    if probe.returncode is None:
        probe.kill()
        await probe.wait()


async def load_slow_clients(ctx: Context, result: Result) -> list[Result]:
    """Scenario h: many phones on a bad network. Each upload is created, then sends its
    whole length in one PATCH whose body arrives at `slow_rate` bytes a second for
    `slow_seconds`, as a tus client's big PATCH does over a slow link (the server holds an
    open request, its lock and its file per upload for the whole time). The uploads start
    spread evenly over `slow_ramp_s`. Meanwhile the probe times a HEAD on a new connection
    (a client coming back to resume) and a 4 KiB PATCH after it. An upload that fails is
    counted by what it got, not raised: how many fail is a result."""
    sizes = ctx.sizes
    count, rate = sizes.slow_uploads, sizes.slow_rate
    seconds = max(0, sizes.slow_seconds)
    length = rate * (seconds + 1)  # a piece as the body starts, then one a second
    failures: Counter[str] = Counter()
    created_at: list[float] = []
    completed = 0

    async def one(http: aiohttp.ClientSession, index: int, started: float) -> None:
        nonlocal completed
        await asyncio.sleep(max(0.0, started + sizes.slow_ramp_s * index / count
                                - time.perf_counter()))  # fmt: skip
        try:
            url, offset = await client.create(http, ctx.endpoint, length, ctx.progress)
            created_at.append(time.monotonic())
            paced = client.paced_body(length - offset, rate, ctx.progress)
            await client.patch(http, url, offset, length - offset, ctx.progress, paced)
            completed += 1
        except (client.LoadError, aiohttp.ClientError, OSError, TimeoutError) as error:
            failures[client.failure_kind(error)] += 1

    probe = await _start_probe(
        ctx, "--new-connection", "--count-failures", "--interval-s", str(SLOW_PROBE_INTERVAL_S),
        "--pair-timeout-s", str(SLOW_PROBE_PAIR_TIMEOUT_S),
    )  # fmt: skip
    try:
        async with client.session(connections=count + 16) as http:
            started, started_at = time.perf_counter(), time.monotonic()
            tasks = [asyncio.create_task(one(http, i, started)) for i in range(count)]
            _done, late = await asyncio.wait(
                tasks, timeout=sizes.slow_ramp_s + seconds * 2 + SLOW_GRACE_S
            )
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            failures["unfinished in time"] += len(late)
            _throughput(result, completed * length, completed, time.perf_counter() - started)
        measured = await _stop_probe(probe)
    finally:
        await _end_probe(probe)
    _latencies(result, measured["head_latencies_ms"])
    result.pair_p50_ms = percentile(measured["latencies_ms"], 0.50)
    result.pair_p99_ms = percentile(measured["latencies_ms"], 0.99)
    for kind, n in measured["failures"].items():
        failures[f"probe: {kind}"] += n
    result.failed = count - completed
    result.failures = {kind: n for kind, n in failures.most_common() if n}
    if created_at:  # the probe's clock is the same: CLOCK_MONOTONIC is system-wide
        result.created_within_s = round(max(created_at) - started_at, 2)
        after = [ms for ms, sent_at in zip(measured["head_latencies_ms"],
                                           measured["heads_sent_at"], strict=True)
                 if sent_at > max(created_at)]  # fmt: skip
        result.created_p99_ms = percentile(after, 0.99)
    heads = zip(measured["head_latencies_ms"], measured["heads_sent_at"], strict=True)
    slowest = sorted(heads, reverse=True)[:SLOWEST_HEADS_KEPT]
    result.slowest_heads = [
        (round(sent_at - started_at, 3), round(ms, 1)) for ms, sent_at in slowest
    ]
    return [result]


LOADS: dict[str, Load] = {
    "a": load_single,
    "b": load_chunked,
    "c": load_concurrent,
    "d": load_small,
    "e": load_soak,
    "g": load_form,
    "h": load_slow_clients,
}


@dataclass
class Run:
    """Where a run keeps its files, and how long one target may take in one scenario."""

    sizes: Sizes
    work_dir: Path
    time_limit_s: float
    node_dir: Path | None
    settle_s: float = 3.0  # pause before each load: see `settle`
    raw_write_bytes: int = RAW_WRITE_BYTES
    server_env: dict[str, str] = field(default_factory=dict)
    repo_root: Path = servers.HERE.parent
    profile_path: Path | None = None  # record the server with py-spy into this file

    def workers_for(self, scenario: Scenario, target: Target) -> int:
        if scenario.key == "c" and target.kind in ("tusserver", "bare"):
            return self.sizes.concurrent_workers
        return 1


async def settle(run: Run) -> None:
    """Wait before a load so that every target starts from the same state of memory.

    On a VM that hands freed memory back to its host (virtio-balloon free page reporting,
    as on the machine of benchmarks/README.md), the pages of a deleted file return to the
    host about a second after the delete, and writing into them again costs the writer
    several times more kernel time than writing into pages still held. A load started right
    after the previous target's files were deleted would run on warm pages, one started
    later on cold ones; after this pause every target starts cold."""
    if run.settle_s > 0:
        await asyncio.sleep(run.settle_s)


async def measure(run: Run, scenario: Scenario, target: Target) -> list[Result]:
    """Run one scenario against one target; a failure becomes a result with `error`."""
    result = Result(scenario.name, target.name, target.label)
    data_dir = run.work_dir / "data" / f"{scenario.key}-{target.name}"
    shutil.rmtree(data_dir, ignore_errors=True)
    try:
        async with asyncio.timeout(run.time_limit_s):
            if target.kind == "raw":
                await settle(run)
                pressure = procstat.PressureWindow()
                await asyncio.to_thread(_measure_raw, run, scenario, data_dir, result,
                                        target.is_durable)  # fmt: skip
                result.cpu_pressure_pct = pressure.percent()
                result.add_cpu_per_gb()
                return [result]
            results = await _measure_server(run, scenario, target, data_dir, result)
            for each in results:
                each.add_cpu_per_gb()
            return results
    except (
        TimeoutError, OSError, ValueError, aiohttp.ClientError, client.LoadError,
        servers.ServerError,
    ) as error:  # fmt: skip
        result.error = f"{type(error).__name__}: {error}"[:500] or type(error).__name__
        if scenario.key == "c":
            failed = Result(SCENARIOS["f"].name, target.name, target.label, error=result.error)
            return [result, failed]
        return [result]
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


async def _measure_server(
    run: Run, scenario: Scenario, target: Target, data_dir: Path, result: Result
) -> list[Result]:
    result.workers = run.workers_for(scenario, target)
    log_path = run.work_dir / "logs" / f"{scenario.key}-{target.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    server = await asyncio.to_thread(
        servers.start, target, data_dir / "server", log_path,
        workers=result.workers, node_dir=run.node_dir, extra_env=run.server_env,
    )  # fmt: skip
    ctx = Context(run.sizes, server.endpoint, client.Progress(), run.repo_root)
    sampler = procstat.Sampler(server.pid, progress=lambda: float(ctx.progress.sent_bytes))
    profiler = None
    try:
        await settle(run)
        if run.profile_path is not None:
            profiler = await _start_profiler(server.pid, run.profile_path)
        sampler.start()
        pressure = procstat.PressureWindow()

        def cost_so_far(into: Result) -> None:
            usage = sampler.usage()
            into.cpu_s, into.cpu_by_process_s = usage.cpu_s, usage.cpu_by_process_s
            into.cpu_pressure_pct = pressure.percent()

        ctx.cost_so_far = cost_so_far
        try:
            results = await LOADS[scenario.key](ctx, result)
        finally:
            usage = await sampler.stop()
            if profiler is not None:
                await _stop_profiler(profiler)
        for each in results:
            each.add_usage(usage)
            if each.cpu_pressure_pct is None:
                each.cpu_pressure_pct = pressure.percent()
        return results
    except Exception as error:
        if server.process.poll() is not None:
            raise servers.ServerError(f"{target.name} exited:\n{server.log_tail()}") from error
        raise
    finally:
        await asyncio.to_thread(server.stop)


# -- profiling (py-spy) ----------------------------------------------------------------------


async def _start_profiler(pid: int, output: Path) -> asyncio.subprocess.Process:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    profiler = await asyncio.create_subprocess_exec(
        py_spy, "record", "--pid", str(pid), "--subprocesses", "--rate", "100",
        "--format", "raw", "--output", str(output),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    await asyncio.sleep(1.0)  # let it attach before the load starts
    return profiler


async def _stop_profiler(profiler: asyncio.subprocess.Process) -> None:
    if profiler.returncode is None:
        profiler.send_signal(signal.SIGINT)
    try:
        await asyncio.wait_for(profiler.wait(), 60)
    except TimeoutError:
        profiler.kill()
        await profiler.wait()


# -- the raw baseline ------------------------------------------------------------------------


def _thread_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_utime + usage.ru_stime


def _measure_raw(
    run: Run, scenario: Scenario, data_dir: Path, result: Result, durable: bool
) -> None:
    """Write the scenario's bytes (one file) or files (scenario d) with plain os.write."""
    sizes, write_bytes = run.sizes, run.raw_write_bytes
    data_dir.mkdir(parents=True, exist_ok=True)
    byte_counts = {
        "a": sizes.single_bytes,
        "b": sizes.single_bytes,
        "g": sizes.single_bytes,
        "c": sizes.concurrent_uploads * sizes.concurrent_bytes,
        "e": sizes.soak_bytes,
    }
    cpu_before = _thread_cpu_s()
    started = time.perf_counter()
    if scenario.key == "d":
        for index in range(sizes.small_count):
            _write_file(data_dir / f"small-{index}", sizes.small_bytes, durable, write_bytes)
        _throughput(result, sizes.small_count * sizes.small_bytes, sizes.small_count,
                    time.perf_counter() - started)  # fmt: skip
    else:
        total = byte_counts[scenario.key]
        _write_file(data_dir / "raw", total, durable, write_bytes)
        _throughput(result, total, 1, time.perf_counter() - started)
        (data_dir / "raw").unlink()
    result.cpu_s = round(_thread_cpu_s() - cpu_before, 2)


def _write_file(path: Path, size: int, durable: bool, write_bytes: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        view = memoryview(HASH_BLOCK * max(1, -(-write_bytes // len(HASH_BLOCK))))[:write_bytes]
        remaining = size
        while remaining > 0:
            remaining -= os.write(fd, view[: min(len(view), remaining)])
        if durable:
            os.fdatasync(fd)
    finally:
        os.close(fd)


def sha256_mb_per_s(total_bytes: int = 512 * 2**20) -> float:
    """hashlib's SHA-256 speed on this machine (one core), in MB/s."""
    blocks = max(1, total_bytes // len(HASH_BLOCK))
    running = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(blocks):
        running.update(HASH_BLOCK)
    return round(blocks * len(HASH_BLOCK) / (time.perf_counter() - started) / 1e6, 1)


async def write_size_sweep(run: Run, total_bytes: int) -> dict[str, dict[str, float]]:
    """Page-cache write speed and kernel CPU by the size of each write() call, each after
    the settle pause: on some kernels and VMs the size of a write changes its cost a lot."""
    folder = run.work_dir / "data" / "sweep"
    found: dict[str, dict[str, float]] = {}
    for write_bytes in SWEEP_WRITE_SIZES:
        await settle(run)
        found[f"{write_bytes // 2**10} KiB"] = await asyncio.to_thread(
            _timed_write, folder, total_bytes, write_bytes
        )
    shutil.rmtree(folder, ignore_errors=True)
    return found


def _timed_write(folder: Path, total_bytes: int, write_bytes: int) -> dict[str, float]:
    folder.mkdir(parents=True, exist_ok=True)
    cpu_before = _thread_cpu_s()
    started = time.perf_counter()
    _write_file(folder / "sweep", total_bytes, False, write_bytes)
    elapsed = time.perf_counter() - started
    cpu = _thread_cpu_s() - cpu_before
    (folder / "sweep").unlink()
    return {"mb_per_s": round(total_bytes / elapsed / 1e6, 1), "cpu_s": round(cpu, 2)}
