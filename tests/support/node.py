"""Clients that run in Node (tus-js-client, and Chromium through playwright-core): the npm
packages pinned in tests/js, and the JSON events a script there prints."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.tools import has_tool, require_tool

JS_DIR = Path(__file__).resolve().parent.parent / "js"


def require_node_package(package: str) -> None:
    """Skip (or fail under TUS_TEST_REQUIRE_ALL=1) unless Node and `package` are installed."""
    require_tool(has_tool("node"), "Node.js is not installed (.ci/install-tools.sh installs it)")
    require_tool(
        (JS_DIR / "node_modules" / package / "package.json").is_file(),
        f"{package} is not installed: run `npm ci` in tests/js (.ci/install-tools.sh does)",
    )


@dataclass
class Run:
    returncode: int
    events: list[dict[str, Any]]
    stderr: str

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [event for event in self.events if event["event"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.of(kind)
        assert len(found) == 1, f"expected one {kind!r} event: {self}"
        return found[0]

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self.of("request")

    def sent(self, method: str) -> list[dict[str, Any]]:
        return [request for request in self.requests if request["method"] == method]


def run_script(script: str, options: dict[str, Any], timeout_s: float) -> Run:
    """Run tests/js/`script` with `options` (as JSON); its JSON events, one a line."""
    process = subprocess.run(
        ["node", str(JS_DIR / script), json.dumps(options)],
        capture_output=True, text=True, timeout=timeout_s, cwd=JS_DIR,
    )  # fmt: skip
    events = [json.loads(line) for line in process.stdout.splitlines() if line.strip()]
    return Run(process.returncode, events, process.stderr)
