"""Issue 18: nothing may be created before a request is known acceptable, and what a crash
leaves between an upload's file and its record heals: the sweeper removes upload files
(data_dir/uploads/<2 hex>/<32 hex>) that no record names once they are older than
--orphan-grace, at start and then every quarter of the grace, through the real service and
Redis. Files of any other shape are never touched, and when no old file has a record at all
(a Redis that lost its state) nothing is removed.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.files import file_of
from tests.support.servers import Server, ServerFactory
from tests.support.tus import create_upload, head_offset, upload_id_of
from tests.support.waiting import wait_until
from tusserver.uploads import expiry

GRACE_S = 3600.0
OLD_S = 2 * GRACE_S


def age(path: Path, age_s: float) -> Path:
    """Make `path` look last changed `age_s` ago."""
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


def orphan(data_dir: Path, upload_id: str, age_s: float) -> Path:
    """An upload file with no record, last changed `age_s` ago."""
    path = file_of(data_dir, upload_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"left behind")
    return age(path, age_s)


@pytest.fixture
async def swept_server(make_server: ServerFactory, tmp_path: Path) -> Server:
    """A server whose sweeper has made its first round of orphans (it makes one when it
    starts, the next a quarter of the grace later): an old orphan left by a crash before it
    started is gone, so this test's own calls are the only ones."""
    left_by_a_crash = orphan(tmp_path / "data", "ff" + "f" * 30, age_s=OLD_S)
    server = await make_server(orphan_grace_s=GRACE_S)
    await wait_until(lambda: not left_by_a_crash.exists(), what="the sweeper's first round")
    return server


async def test_an_old_file_without_a_record_is_removed_and_nothing_else(
    swept_server: Server, http: aiohttp.ClientSession
) -> None:
    server, data_dir = swept_server, swept_server.settings.data_dir
    old_orphan = orphan(data_dir, "ab" + "0" * 30, age_s=OLD_S)
    young_orphan = orphan(data_dir, "ab" + "1" * 30, age_s=60)
    recorded = age(server.file_of(await create_upload(http, server.url, 3)), OLD_S)
    uploads_dir = data_dir / "uploads"
    other_shapes = [
        uploads_dir / "ab" / "notes.txt",
        uploads_dir / "ab" / ("c" * 32 + ".part"),
        uploads_dir / "ab" / ("C" * 32),
        uploads_dir / "ab" / ("c" * 33),
        uploads_dir / "zz" / ("c" * 32),
        uploads_dir / "AB" / ("c" * 32),
        uploads_dir / ("c" * 32),
        data_dir / ("c" * 32),
    ]
    for path in other_shapes:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not an upload file")
        age(path, OLD_S)

    assert await expiry.remove_orphans(server.uploads, time.time()) == 1
    assert not old_orphan.exists()
    assert young_orphan.exists() and recorded.exists()
    assert all(path.exists() for path in other_shapes)
    # past the grace the young orphan goes too; a file with a record never does
    assert await expiry.remove_orphans(server.uploads, time.time() + GRACE_S) == 1
    assert not young_orphan.exists() and recorded.exists()
    assert await head_offset(http, server.url + upload_id_of(str(recorded))) == 0


async def test_a_folder_named_like_an_upload_file_is_left_alone(swept_server: Server) -> None:
    data_dir = swept_server.settings.data_dir
    folder = data_dir / "uploads" / "cd" / ("cd" + "2" * 30)
    folder.mkdir(parents=True)
    age(folder, OLD_S)
    old_orphan = orphan(data_dir, "cd" + "3" * 30, age_s=OLD_S)
    assert await expiry.remove_orphans(swept_server.uploads, time.time()) == 1
    assert folder.is_dir() and not old_orphan.exists()


async def test_no_file_is_removed_when_no_old_file_has_a_record(
    swept_server: Server, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Eleven old files and not one with a record: that is a Redis that lost its state (or
    the wrong Redis), not crashes; removing them would lose every upload."""
    caplog.set_level(logging.ERROR, logger="tusserver.uploads")
    server, data_dir = swept_server, swept_server.settings.data_dir
    orphans = [orphan(data_dir, f"{n:02x}" + "4" * 30, age_s=OLD_S) for n in range(11)]
    assert await expiry.remove_orphans(server.uploads, time.time()) == 0
    assert all(path.exists() for path in orphans)
    assert any("Nothing was removed" in r.getMessage() for r in caplog.records)
    # one old file with a record: the others are orphans after all
    recorded = age(server.file_of(await create_upload(http, server.url, 3)), OLD_S)
    assert await expiry.remove_orphans(server.uploads, time.time()) == 11
    assert not any(path.exists() for path in orphans)
    assert recorded.exists()
