"""The servers under test, each started as a real subprocess on 127.0.0.1 with its own data
directory, and stopped by its pid (its own descendants too, matched by pid and start time).

The Node reference server is installed from npm into `<work-dir>/node/` (git-ignored) the
first time it is needed, at the pinned versions below. The tuspyserver peer runs in this
interpreter and needs `pip install -e '.[bench]'` (tuspyserver and uvicorn).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import procstat

HERE = Path(__file__).resolve().parent
NODE_PACKAGES = {"@tus/server": "2.4.5", "@tus/file-store": "2.1.1"}
NODE_SERVER_FILE = "tus_node_server.mjs"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
LISTENING = re.compile(r"listening on (http://\S+)")


@dataclass(frozen=True)
class Target:
    """One thing the scenarios measure: a server, or the raw disk write."""

    name: str
    label: str
    kind: str  # "tusserver", "bare", "node", "tuspy" or "raw"
    is_durable: bool = False  # fsyncs: compared with the raw write that fsyncs too


TARGETS = {
    target.name: target
    for target in (
        Target("raw", "raw write (no fsync)", "raw"),
        Target("raw-fsync", "raw write + fdatasync", "raw", is_durable=True),
        Target("tusserver", "tusserver --fsync never", "tusserver"),
        Target("tusserver-durable", "tusserver (default: --fsync always)", "tusserver", True),
        Target("bare-aiohttp", "bare aiohttp append", "bare"),
        Target("tus-node", "@tus/server + @tus/file-store", "node"),
        Target("tuspy", "tuspyserver (FastAPI + uvicorn)", "tuspy"),
    )
}


class ServerError(Exception):
    """A server could not be installed or started; the message says why."""


@dataclass
class RunningServer:
    target: Target
    process: subprocess.Popen[bytes]
    endpoint: str
    data_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM the root and wait; SIGKILL it and any descendant left behind."""
        tree = procstat.process_tree(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        left = [p for p in tree if p.pid != self.process.pid]
        while any(procstat.is_alive(p) for p in left) and time.monotonic() < deadline:
            time.sleep(0.05)
        for process in left:
            if procstat.is_alive(process):
                os.kill(process.pid, signal.SIGKILL)


def _clean_environment() -> dict[str, str]:
    """This environment without TUS_* settings, so every server runs on its defaults and
    the flags the harness passes."""
    return {key: value for key, value in os.environ.items() if not key.startswith("TUS_")}


def command(target: Target, data_dir: Path, workers: int, node_dir: Path | None) -> list[str]:
    if target.kind == "tusserver":
        args = [sys.executable, "-m", "tusserver", "--host", "127.0.0.1", "--port", "0",
                "--data-dir", str(data_dir), "--workers", str(workers)]  # fmt: skip
        return args if target.is_durable else [*args, "--fsync", "never"]
    if target.kind == "bare":
        return [sys.executable, "-m", "benchmarks.bare_append", "--port", "0",
                "--data-dir", str(data_dir), "--workers", str(workers)]  # fmt: skip
    if target.kind == "tuspy":
        return [sys.executable, "-m", "benchmarks.tuspy_server", "--port", "0",
                "--data-dir", str(data_dir)]  # fmt: skip
    if target.kind == "node":
        if node_dir is None:
            raise ServerError("the Node server is not installed")
        return ["node", str(node_dir / NODE_SERVER_FILE), "0", str(data_dir)]
    raise ServerError(f"{target.name} is not a server")


def start(
    target: Target,
    data_dir: Path,
    log_path: Path,
    *,
    workers: int,
    node_dir: Path | None,
    extra_env: dict[str, str] | None = None,
) -> RunningServer:
    """Start the target's server and wait until it prints the URL it listens on.
    `extra_env` is added to its environment (for experiments, e.g. MALLOC_* variables)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command(target, data_dir, workers, node_dir),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**_clean_environment(), **(extra_env or {})},
            cwd=HERE.parent,
        )
    server = RunningServer(target, process, "", data_dir, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and process.poll() is None:
        match = LISTENING.search(log_path.read_text(errors="replace"))
        if match:
            server.endpoint = match.group(1)
            if target.kind == "tusserver" and workers > 1:
                _wait_for_workers(server, workers)
            return server
        time.sleep(0.05)
    server.stop()
    raise ServerError(f"{target.name} did not start:\n{server.log_tail()}")


def _wait_for_workers(server: RunningServer, workers: int) -> None:
    """tusserver prints its URL before it forks: wait until the workers exist."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        children = [p for p in procstat.process_tree(server.pid) if p.pid != server.pid]
        pythons = [p for p in children if procstat.command_name(p).startswith("python")]
        if len(pythons) >= workers:
            return
        time.sleep(0.05)


def tuspy_missing() -> str | None:
    """Why the tuspyserver peer cannot run in this interpreter, or None when it can."""
    needed = ("tuspyserver", "uvicorn")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed (pip install -e '.[bench]')"


def tuspy_version() -> str | None:
    try:
        return importlib.metadata.version("tuspyserver")
    except importlib.metadata.PackageNotFoundError:
        return None


def node_available() -> bool:
    return shutil.which("node") is not None and shutil.which("npm") is not None


def install_node_server(node_dir: Path) -> Path:
    """Install the pinned @tus packages into `node_dir` (once) and put the server file
    beside them; the folder to run it from. Raises ServerError without node or npm."""
    if not node_available():
        raise ServerError("node and npm are needed for the @tus/server baseline")
    node_dir.mkdir(parents=True, exist_ok=True)
    if not all(_installed_version(node_dir, name) == v for name, v in NODE_PACKAGES.items()):
        manifest = {"private": True, "dependencies": NODE_PACKAGES}
        (node_dir / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
        result = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund"],
            cwd=node_dir,
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(f"npm install failed:\n{result.stderr[-2000:]}")
    shutil.copyfile(HERE / NODE_SERVER_FILE, node_dir / NODE_SERVER_FILE)
    return node_dir


def _installed_version(node_dir: Path, name: str) -> str | None:
    manifest = node_dir / "node_modules" / name / "package.json"
    try:
        return str(json.loads(manifest.read_text())["version"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def node_version() -> str | None:
    if shutil.which("node") is None:
        return None
    result = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    return result.stdout.strip() or None
