"""Run the benchmark: `python -m benchmarks.run` (see benchmarks/README.md).

Prints one JSON object per line on stdout (the machine, every result, every target of the
issue), then the Markdown table; progress goes to stderr. `--json` and `--markdown` also
write them to files.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks import client, report, scenarios, servers
from benchmarks.scenarios import QUICK_SIZES, SCENARIOS, Result, Run, Sizes
from benchmarks.servers import TARGETS
from tusserver.settings import SettingError, parse_size

DEFAULT_TARGETS = ("raw", "raw-fsync", "tusserver", "tusserver-durable", "bare-aiohttp", "tus-node",
                   "tuspy")  # fmt: skip


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except SettingError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Measure tusserver beside a raw disk write, a bare aiohttp append handler, "
        "@tus/server (Node) and tuspyserver (FastAPI), in one run. Sizes take units: 2GiB, "
        "8MiB, 1KiB.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes (256 MiB single, 8 x 16 MiB, 200 small, 1 GiB soak, 200 slow "
        "uploads for 10 s)",
    )
    parser.add_argument(
        "--scenarios",
        default="a,b,c,d,e,g,h",
        help="letters of the scenarios to run; f runs with c [default: a,b,c,d,e,g,h]",
    )
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help=f"comma-separated, of: {', '.join(TARGETS)} [default: all]",
    )
    parser.add_argument("--single-bytes", type=_size, help="size of the upload in a, b and g")
    parser.add_argument("--patch-bytes", type=_size, help="PATCH size in b [default: 8MiB]")
    parser.add_argument("--concurrent-uploads", type=int, help="uploads at once in c")
    parser.add_argument("--concurrent-bytes", type=_size, help="size of each upload in c")
    parser.add_argument("--concurrent-workers", type=int, help="server processes in c")
    parser.add_argument("--small-count", type=int, help="number of small uploads in d")
    parser.add_argument("--small-bytes", type=_size, help="size of each small upload in d")
    parser.add_argument("--small-concurrency", type=int, help="small uploads in flight in d")
    parser.add_argument("--soak-bytes", type=_size, help="size of the upload in e")
    parser.add_argument("--latency-pairs", type=int,
                        help="f: c's load goes on until the probe has this many HEAD+PATCH "
                        "pairs [300]")  # fmt: skip
    parser.add_argument("--slow-uploads", type=int, help="slow uploads at once in h [2000]")
    parser.add_argument("--slow-rate", type=_size,
                        help="bytes per second each slow upload sends in h [1KiB]")  # fmt: skip
    parser.add_argument("--slow-seconds", type=int,
                        help="seconds each slow upload lasts in h [20]")  # fmt: skip
    parser.add_argument("--slow-ramp-s", type=float,
                        help="seconds over which h's uploads start [1]")  # fmt: skip
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=servers.HERE / ".work",
        help="data, logs and the Node install [default: benchmarks/.work]",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=1800.0,
        help="seconds one target may take in one scenario [default: 1800]",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=3.0,
        help="seconds to pause before each load, so every target starts with "
        "the same (cold) memory; see the README [default: 3]",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each target in a-d, interleaved; the median run is reported [default: 3]",
    )
    parser.add_argument(
        "--soak-repeat", type=int, default=1, help="runs of each target in e [default: 1]"
    )
    parser.add_argument(
        "--raw-write-bytes",
        type=_size,
        default=scenarios.RAW_WRITE_BYTES,
        help="size of each write() of the raw baseline [default: 64KiB]",
    )
    parser.add_argument(
        "--no-sweep",
        dest="sweep",
        action="store_false",
        help="skip measuring page-cache write speed by write size",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="add to every server's environment (for experiments); repeatable",
    )
    parser.add_argument("--json", type=Path, help="also write the JSON lines to this file")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument("--profile", nargs="?", const="a", metavar="LETTERS",
                        help="afterwards, run these scenarios (default: a) once more on "
                        "`tusserver --fsync never` under py-spy and print the top costs "
                        "(needs `pip install py-spy`)")  # fmt: skip
    return parser


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = QUICK_SIZES if args.quick else Sizes()
    given = {
        name: getattr(args, name)
        for name in Sizes.__dataclass_fields__
        if getattr(args, name, None) is not None
    }
    return replace(sizes, **given)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _command_output(*args: str) -> str:
    try:
        result = subprocess.run(args, capture_output=True, text=True, check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip()


def machine_facts(work_dir: Path) -> dict[str, Any]:
    """What the numbers were measured on, and how busy the machine was."""
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    df = _command_output("df", "-h", "--output=source,fstype,size,avail", str(work_dir))
    return {
        "kind": "machine",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "disk": " ".join(df.splitlines()[-1].split()) if df else None,
        "loadavg_at_start": _loadavg(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "node": servers.node_version(),
        "node_packages": servers.NODE_PACKAGES,
        "tuspyserver": servers.tuspy_version(),
        "tusserver_commit": _command_output("git", "-C", str(servers.HERE.parent),
                                            "rev-parse", "--short", "HEAD") or None,
    }  # fmt: skip


def _loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def _emit(line: dict[str, Any], sink: list[str]) -> None:
    text = json.dumps(line, sort_keys=False)
    sink.append(text)
    print(text, flush=True)


async def run_all(args: argparse.Namespace) -> int:
    sizes = sizes_from(args)
    keys = [k.strip() for k in args.scenarios.split(",") if k.strip()]
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = [k for k in keys if k not in scenarios.LOADS] + [n for n in names if n not in TARGETS]
    if unknown:
        _progress(f"unknown scenario or target: {', '.join(unknown)}")
        return 2
    work_dir: Path = args.work_dir
    lines: list[str] = []
    results: list[Result] = []
    node_dir = None
    if "tus-node" in names:
        try:
            node_dir = await asyncio.to_thread(servers.install_node_server, work_dir / "node")
        except servers.ServerError as error:
            _progress(f"the @tus/server baseline is left out: {error}")
    if "tuspy" in names and (missing := servers.tuspy_missing()) is not None:
        _progress(f"the tuspyserver peer is left out: {missing}")
        names.remove("tuspy")
    if "h" in keys:
        wanted = sizes.slow_uploads + 256  # the slow uploads' sockets, and room for the rest
        if (limit := client.raise_open_file_limit()) < wanted:
            _progress(f"h needs about {wanted} open files, the limit is {limit}: expect errors")
    facts = machine_facts(work_dir)
    facts["command"] = shlex.join(["python", "-m", "benchmarks.run", *sys.argv[1:]])
    facts["sizes"] = asdict(sizes)
    sha256 = await asyncio.to_thread(scenarios.sha256_mb_per_s)
    facts["sha256_mb_per_s"] = sha256
    server_env = dict(item.partition("=")[::2] for item in args.server_env)
    run = Run(sizes, work_dir, args.time_limit, node_dir, args.settle, args.raw_write_bytes,
              server_env)  # fmt: skip
    if args.sweep:
        _progress("page-cache write speed by write size ...")
        sweep_bytes = min(sizes.single_bytes, 2**30)
        facts["write_size_sweep_bytes"] = sweep_bytes
        facts["write_size_sweep"] = await scenarios.write_size_sweep(run, sweep_bytes)
    _emit(facts, lines)
    names = [n for n in names if TARGETS[n].kind != "node" or node_dir is not None]
    for key in keys:
        results += await _measure_rounds(run, key, names, args.soak_repeat if key == "e" else
                                         args.repeat)  # fmt: skip
    report.add_ratios(results)
    for result in results:
        _emit(result.as_json(), lines)
    for check in report.checks(results, sha256):
        _emit(check.as_json(), lines)
    _emit({"kind": "end", "loadavg_at_end": _loadavg()}, lines)
    table = report.markdown(results, sizes, facts)
    print(table, flush=True)
    if args.json:
        args.json.write_text("\n".join(lines) + "\n")
    if args.markdown:
        args.markdown.write_text(table)
    for key in (args.profile or "").split(","):
        if key.strip() in scenarios.LOADS:
            await profile_scenario(run, key.strip())
    shutil.rmtree(work_dir / "data", ignore_errors=True)
    return 1 if any(r.error for r in results) else 0


async def _measure_rounds(run: Run, key: str, names: list[str], rounds: int) -> list[Result]:
    """`rounds` runs of every target in one scenario, round after round (so a noisy minute
    hits every target alike); one row per target and scenario, from the median run."""
    runs: dict[tuple[str, str], list[Result]] = {}
    for round_number in range(1, max(1, rounds) + 1):
        for name in (n for n in names if SCENARIOS[key].takes(TARGETS[n])):
            _progress(f"{SCENARIOS[key].name}: {name}, run {round_number} of {rounds} ...")
            for result in await scenarios.measure(run, SCENARIOS[key], TARGETS[name]):
                runs.setdefault((result.scenario, result.target), []).append(result)
                _progress(f"  {_summary(result)}")
    metric_of = {s.name: s.metric for s in SCENARIOS.values()}
    return [scenarios.combine(each, metric_of[scenario]) for (scenario, _), each in runs.items()]


def _summary(result: Result) -> str:
    if result.error:
        return f"{result.scenario} error: {result.error}"
    parts = [f"{result.scenario}", f"{result.elapsed_s:.2f} s"]
    if result.mb_per_s is not None:
        parts.append(f"{result.mb_per_s:,.1f} MB/s")
    if result.uploads_per_s is not None:
        parts.append(f"{result.uploads_per_s:,.1f} uploads/s")
    if result.p99_ms is not None:
        parts.append(f"p50 {result.p50_ms} ms p99 {result.p99_ms} ms")
    if result.cpu_s is not None:
        parts.append(f"cpu {result.cpu_s} s")
    if result.peak_rss_mib is not None:
        parts.append(f"peak rss {result.peak_rss_mib} MiB")
    if result.cpu_pressure_pct is not None:
        parts.append(f"cpu pressure {result.cpu_pressure_pct}%")
    return ", ".join(parts)


async def profile_scenario(run: Run, key: str) -> None:
    """One scenario on `tusserver --fsync never` once more, under py-spy; the top costs."""
    scenario = SCENARIOS[key]
    output = run.work_dir / f"profile-{key}-tusserver.txt"
    profiled = replace(run, profile_path=output)
    _progress(f"profiling {scenario.name} on tusserver with py-spy ...")
    measured = await scenarios.measure(profiled, scenario, TARGETS["tusserver"])
    _progress(f"  (under py-spy) {_summary(measured[0])}")
    if not output.exists():
        _progress("  py-spy wrote no profile (is it installed? `pip install py-spy`)")
        return
    summary = summarize_profile(output.read_text(), f"{scenario.name} on tusserver --fsync never")
    (run.work_dir / f"profile-{key}-tusserver-summary.txt").write_text(summary)
    print(summary, flush=True)


def summarize_profile(collapsed: str, title: str, top: int = 25) -> str:
    """Top functions by own and by total samples, from py-spy's collapsed stacks (idle
    threads excluded, as py-spy records them by default)."""
    own: Counter[str] = Counter()
    own_lines: Counter[str] = Counter()
    total: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        threads[";".join(frames[:2])] += count
        functions = [_function(frame) for frame in frames[2:]] or [frames[-1]]
        own[functions[-1]] += count
        own_lines[frames[-1]] += count
        for function in set(functions):
            total[function] += count
    lines = [f"py-spy, {title}: {samples} samples (100 Hz, wall clock)", "",
             "by thread:"]  # fmt: skip
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in threads.most_common(8)]
    lines += ["", "own time (the function itself was on CPU, or the C code it called):"]
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", "own time by line:"]
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in own_lines.most_common(top)]
    lines += ["", "total time (the function or anything it called):"]
    lines += [f"  {100 * n / samples:5.1f}%  {name}" for name, n in total.most_common(top)]
    return "\n".join(lines) + "\n"


def _function(frame: str) -> str:
    """`name (path/file.py:12)` -> `name (file.py)`: one entry per function, not per line."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({'/'.join(Path(path).parts[-2:])})" if path else name


def main() -> int:
    args = make_parser().parse_args()
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(run_all(args))


if __name__ == "__main__":
    sys.exit(main())
