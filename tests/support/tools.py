"""Tools a test needs that pip cannot install (Node, Chromium, strace, unshare)."""

from __future__ import annotations

import os
import shutil

import pytest


def has_tool(name: str) -> bool:
    return shutil.which(name) is not None


def require_tool(available: bool, reason: str) -> None:
    """Skip (plain pytest) or fail (TUS_TEST_REQUIRE_ALL=1) when a tool is missing."""
    if available:
        return
    if os.environ.get("TUS_TEST_REQUIRE_ALL") == "1":
        pytest.fail(f"required under TUS_TEST_REQUIRE_ALL=1: {reason}")
    pytest.skip(reason)
