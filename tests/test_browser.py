"""The demo page: served from the package's static files, and used for real in Debian's headless
Chromium (driven by playwright-core from tests/js) against real tusserver processes, from
another origin than the endpoint so that CORS is really exercised. Screenshots land in the
test's tmp_path, where the test checks them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests.support.files import random_file
from tests.support.node import Run, require_node_package, run_script
from tests.support.processes import ServerProcess, tusserver_process
from tests.support.servers import ServerFactory
from tests.support.sync_http import assert_stored_exactly, head, http_request, metadata_of
from tests.support.tools import require_tool
from tests.support.tus import bearer
from tusserver.auth import issue_token
from tusserver.http import demo
from tusserver.settings import Settings

MiB = 2**20
CHROMIUM = Path("/usr/bin/chromium")
SECRET = "browser-secret"


# -- the page over HTTP (no browser needed) ------------------------------------------------


async def test_development_mode_serves_the_page_and_its_files(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    async with http.get(server.root + "/") as response:
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "connect-src * blob:" in response.headers["Content-Security-Policy"]
        page = await response.text()
    assert '<meta name="tus-endpoint" content="/files/">' in page
    assert '<meta name="tus-secured" content="false">' in page
    assert '<script src="static/vendor/uppy/uppy.min.js">' in page
    for path, kind in [
        ("static/vendor/uppy/uppy.min.js", "javascript"),
        ("static/vendor/uppy/uppy.min.css", "text/css"),
        ("static/demo.js", "javascript"),
        ("static/vendor/uppy/LICENSE.txt", "text/plain"),
        ("static/vendor/uppy/THIRD-PARTY-LICENSES.txt", "text/plain"),
    ]:
        async with http.get(f"{server.root}/{path}") as response:
            assert response.status == 200, path
            assert kind in response.content_type, (path, response.content_type)
            assert len(await response.read()) > 500, path
    async with http.get(server.root + "/static/") as response:
        assert response.status in (403, 404)  # no directory listing


async def test_the_page_has_a_plain_form_that_comes_back_to_the_page_it_was_served_from(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server()
    async with http.get(server.root + "/") as response:
        policy = response.headers["Content-Security-Policy"]
        page = await response.text()
    assert "form-action 'self';" in policy
    form = '<form id="plain-form" method="post" action="/files/" enctype="multipart/form-data">'
    assert form in page
    assert f'<input type="hidden" name="redirect" value="{server.root}/">' in page
    async with http.get(server.root + "/", headers={"Host": "elsewhere.example"}) as response:
        assert 'name="redirect"' not in await response.text()  # no URL made for that Host

    behind = await make_server(public_url="https://up.example/tus/files/")
    async with http.get(behind.root + "/") as response:
        policy = response.headers["Content-Security-Policy"]
        page = await response.text()
    assert "form-action 'self' https://up.example;" in policy
    assert 'action="https://up.example/tus/files/"' in page
    assert '<input type="hidden" name="redirect" value="https://up.example/tus/">' in page


async def test_vendored_bundle_matches_its_recorded_checksums() -> None:
    """VERSION (written by scripts/build-demo-page.sh) holds the SHA-256 of each file as npm
    shipped it; a hand-edited or half-copied bundle fails here."""
    vendor = demo.STATIC_DIR / "vendor" / "uppy"
    lines = (vendor / "VERSION").read_text().splitlines()
    assert lines[0].startswith("uppy ")
    sums = {name: digest for digest, name in (line.split() for line in lines[1:])}
    assert set(sums) == {"uppy.min.js", "uppy.min.css"}
    for name, digest in sums.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest


async def test_secured_mode_has_no_page_unless_asked(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    quiet = await make_server(secrets=("s",))
    for path in ("/", "/static/demo.js"):
        async with http.get(quiet.root + path) as response:
            assert response.status == 404, path

    shown = await make_server(secrets=("s",), demo_page=True)
    async with http.get(shown.root + "/") as response:  # no token needed for the page
        assert response.status == 200
        assert '<meta name="tus-secured" content="true">' in await response.text()
    async with http.get(shown.root + "/static/vendor/uppy/uppy.min.js") as response:
        assert response.status == 200


async def test_development_mode_page_can_be_turned_off(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(demo_page=False)
    async with http.get(server.root + "/") as response:
        assert response.status == 404


async def test_page_on_a_root_endpoint_gives_way_to_tus(
    make_server: ServerFactory, http: aiohttp.ClientSession
) -> None:
    server = await make_server(base_path="/")
    root = server.url.rstrip("/")
    async with http.post(root + "/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "1"}) as r:
        assert r.status == 201
    async with http.get(root + "/") as response:
        assert response.content_type != "text/html"


def test_page_shows_the_public_url_escaped() -> None:
    settings = Settings(public_url='https://up.example/files?a="b"&c')
    page = demo.render_page('<meta content="{{endpoint}}">', settings)
    assert page == '<meta content="https://up.example/files?a=&quot;b&quot;&amp;c">'


# -- Chromium ---------------------------------------------------------------------------------


def require_browser() -> None:
    require_tool(
        CHROMIUM.exists(), "Debian's chromium is missing (.ci/install-tools.sh installs it)"
    )
    require_node_package("playwright-core")


def run_browser(**options: Any) -> Run:
    """Run tests/js/browser_demo.mjs with `options`; its JSON events."""
    return run_script("browser_demo.mjs", options, timeout_s=180)


def assert_no_page_faults(run: Run) -> None:
    """No script error, no CSP violation, no CORS refusal in the page's console."""
    faults = [
        event["text"] for event in run.of("console")
        if event["type"] == "pageerror" or "CSP" in event["text"] or "CORS" in event["text"]
    ]  # fmt: skip
    assert faults == []


def assert_screenshot(path: Path) -> None:
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert path.stat().st_size > 10_000  # a drawn page, not a blank one


@pytest.fixture(scope="module")
def browser_tools() -> None:
    require_browser()


@pytest.fixture(scope="module")
def page_server(
    browser_tools: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """Development mode: serves the page (opened as http://localhost:PORT/) and an endpoint."""
    yield from tusserver_process(tmp_path_factory.mktemp("page") / "data")


@pytest.fixture(scope="module")
def secured_server(
    browser_tools: None, tmp_path_factory: pytest.TempPathFactory, page_server: ServerProcess
) -> Iterator[ServerProcess]:
    """Secured, with its own page, allowing one other origin: the page server's."""
    yield from tusserver_process(
        tmp_path_factory.mktemp("secured-page") / "data",
        "--secret", SECRET, "--demo-page",
        "--cors-origins", f"http://localhost:{page_server.port}",
    )  # fmt: skip


def token(subject: str, *actions: str) -> str:
    return issue_token(SECRET, subject=subject, actions=actions, ttl_s=600)


def is_batch_request(request: dict[str, Any]) -> bool:
    return "/files/batches" in str(request["url"])


@pytest.mark.slow
def test_demo_page_sends_the_files_of_one_upload_as_one_batch(
    page_server: ServerProcess, tmp_path: Path
) -> None:
    """A folder picked through the Dashboard's folder input (the browser gives each of its files
    its relative path, as for a dropped folder) and a file picked alone go in one run: one
    batch, completed on the server with each file at its path, and shown complete on the
    page."""
    folder = tmp_path / "album"
    (folder / "disc1" / "extras").mkdir(parents=True)
    contents = {
        "album/cover.jpg": random_file(folder / "cover.jpg", 40_000),
        "album/disc1/track 1.flac": random_file(folder / "disc1" / "track 1.flac", MiB + 5),
        "album/disc1/extras/notes.txt": random_file(folder / "disc1" / "extras" / "notes.txt", 9),
        "liner.pdf": random_file(tmp_path / "liner.pdf", 3000),
    }
    port = page_server.port
    screenshot = tmp_path / "demo-page-batch.png"
    run = run_browser(
        pageUrl=f"http://localhost:{port}/?endpoint=http://127.0.0.1:{port}/files/",
        file=str(tmp_path / "liner.pdf"),
        folder=str(folder),
        expectUploads=len(contents),
        screenshot=str(screenshot),
    )
    assert run.returncode == 0, run

    [opened] = [r for r in run.sent("POST") if is_batch_request(r)]
    assert opened["url"] == f"http://127.0.0.1:{port}/files/batches"
    assert len([r for r in run.sent("POST") if not is_batch_request(r)]) == len(contents)
    shown = run.one("batch")
    assert shown["state"] == "completed"
    match = re.fullmatch(r"batch (\S+): completed, 4 files", shown["text"])
    assert match, shown
    answer = http_request("GET", f"http://127.0.0.1:{port}/files/batches/{match.group(1)}")
    assert answer.status == 200, answer
    batch = json.loads(answer.body)
    assert batch["state"] == "completed"
    assert batch["expected"]["files"] == len(contents)
    members = {member["path"]: member for member in batch["members"]}
    assert set(members) == set(contents)
    for path, data in contents.items():
        assert members[path]["sha256"] == hashlib.sha256(data).hexdigest(), path
        assert_stored_exactly(members[path]["url"], data)
    links = {link["name"]: link["url"] for link in run.one("success")["links"]}
    assert links["track 1.flac"] == members["album/disc1/track 1.flac"]["url"]
    assert_no_page_faults(run)
    assert_screenshot(screenshot)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "is_picked_again"),
    [(8 * MiB, False), (12 * MiB, True)],
    ids=["kept-by-golden-retriever", "picked-again"],
)
def test_demo_page_uploads_across_origins_and_resumes_after_a_reload(
    page_server: ServerProcess, tmp_path: Path, size: int, is_picked_again: bool
) -> None:
    """Uppy keeps files up to 10 MiB across a reload; bigger ones the person picks again. Either
    way the upload goes on from the bytes the server kept (tus-js-client's stored URL + HEAD)."""
    data = random_file(tmp_path / "holiday.mp4", size)
    port = page_server.port
    screenshot = tmp_path / f"demo-page-resumed-after-reload-{size // MiB}MiB.png"
    run = run_browser(
        # the page's origin is localhost, the endpoint's 127.0.0.1: every request is CORS
        pageUrl=f"http://localhost:{port}/?endpoint=http://127.0.0.1:{port}/files/",
        file=str(tmp_path / "holiday.mp4"),
        screenshot=str(screenshot),
        reloadAfterBytes=3 * MiB,
        uploadBytesPerSecond=2 * MiB,  # the reload lands while the PATCH is running
        reselectAfterReload=is_picked_again,
    )
    assert run.returncode == 0, run

    [created] = [r for r in run.sent("POST") if not is_batch_request(r)]
    assert created["phase"] == "before-reload"
    # the file keeps its batch across the reload: one batch, opened before it
    [opened] = [r for r in run.sent("POST") if is_batch_request(r)]
    assert opened["phase"] == "before-reload"
    assert re.fullmatch(r"batch \S+: completed, 1 file", run.one("batch")["text"])
    kept = run.one("kept")
    assert kept["status"] == 200
    assert 0 < kept["offset"] < len(data)  # the cut-off PATCH kept what had arrived
    resumed = [r for r in run.sent("PATCH") if r["phase"] == "after-reload"]
    assert resumed[0]["url"] == kept["url"]
    assert resumed[0]["offset"] == str(kept["offset"])
    assert run.one("success")["url"] == kept["url"]
    assert_stored_exactly(kept["url"], data)
    assert_no_page_faults(run)
    log = page_server.log()
    assert "OPTIONS /files/ 204" in log  # Chromium's preflight, answered
    assert_screenshot(screenshot)
    assert_screenshot(Path(str(screenshot).replace(".png", "-restored.png")))


@pytest.mark.slow
def test_secured_page_takes_its_token_from_the_fragment(
    secured_server: ServerProcess, tmp_path: Path
) -> None:
    data = random_file(tmp_path / "report.pdf", MiB + 17)
    screenshot = tmp_path / "demo-page-secured.png"
    fragment = f"#token={token('ada', 'create', 'upload')}"
    run = run_browser(
        pageUrl=f"http://127.0.0.1:{secured_server.port}/{fragment}",
        file=str(tmp_path / "report.pdf"),
        screenshot=str(screenshot),
    )
    assert run.returncode == 0, run
    assert "token" not in run.one("address")["url"]  # moved out of the address bar
    url = run.one("success")["url"]
    assert_stored_exactly(url, data, bearer(token("ada", "read")))
    assert head(url, bearer(token("ada", "read"))).status == 200
    not_owner = http_request(
        "HEAD", url, {"Tus-Resumable": "1.0.0", **bearer(token("bob", "read"))}
    )
    assert not_owner.status == 404
    assert_no_page_faults(run)
    assert_screenshot(screenshot)


@pytest.mark.slow
def test_secured_endpoint_serves_its_configured_origin_only(
    page_server: ServerProcess, secured_server: ServerProcess, tmp_path: Path
) -> None:
    data = random_file(tmp_path / "notes.txt", 300_000)
    endpoint = f"http://127.0.0.1:{secured_server.port}/files/"
    fragment = f"#token={token('ada', 'create', 'upload')}"

    allowed = run_browser(
        pageUrl=f"http://localhost:{page_server.port}/?endpoint={endpoint}{fragment}",
        file=str(tmp_path / "notes.txt"),
        screenshot=str(tmp_path / "demo-page-secured-cross-origin.png"),
    )
    assert allowed.returncode == 0, allowed
    assert_no_page_faults(allowed)
    assert_stored_exactly(allowed.one("success")["url"], data, bearer(token("ada", "read")))

    posts_before = secured_server.log().count("POST /files/")
    refused = run_browser(  # 127.0.0.1:PORT is another origin than localhost:PORT
        pageUrl=f"http://127.0.0.1:{page_server.port}/?endpoint={endpoint}{fragment}",
        file=str(tmp_path / "notes.txt"),
        screenshot=str(tmp_path / "demo-page-secured-other-origin.png"),
        expectBlocked=True,
    )
    assert refused.returncode == 0, refused
    assert "Access-Control-Allow-Origin" in refused.one("blocked")["text"]
    assert secured_server.log().count("POST /files/") == posts_before  # stopped at preflight


@pytest.mark.slow
def test_demo_pages_plain_form_posted_from_chromium_stores_each_file_and_comes_back(
    page_server: ServerProcess, tmp_path: Path
) -> None:
    """The browser's own multipart/form-data submission, no JavaScript of ours in it: the
    server answers 303 to the page with the new uploads' ids, and each file is stored whole,
    with its SHA-256 and the note, file name and type as metadata."""
    files = {
        "holiday.jpg": (random_file(tmp_path / "holiday.jpg", MiB + 17), b"image/jpeg"),
        "notes.txt": (random_file(tmp_path / "notes.txt", 300_000), b"text/plain"),
    }
    page_url = f"http://127.0.0.1:{page_server.port}/"
    screenshot = tmp_path / "demo-page-plain-form.png"
    run = run_script(
        "browser_form.mjs",
        {"pageUrl": page_url, "files": [str(tmp_path / name) for name in files],
         "note": "from Chromium", "screenshot": str(screenshot)},
        timeout_s=120,
    )  # fmt: skip
    assert run.returncode == 0, run
    [answer] = run.of("response")  # the form's one POST
    assert answer["url"] == page_server.url
    assert answer["status"] == 303
    landed = run.one("landed")
    assert landed["url"] == answer["location"]
    address = urlsplit(landed["url"])
    assert f"{address.scheme}://{address.netloc}{address.path}" == page_url
    upload_ids = parse_qs(address.query)["uploads"][0].split(",")
    assert landed["listed"] == upload_ids  # the page links what came back
    assert landed["links"] == [page_server.url + upload_id for upload_id in upload_ids]
    for upload_id, (name, (data, filetype)) in zip(upload_ids, files.items(), strict=True):
        url = page_server.url + upload_id
        assert_stored_exactly(url, data)
        assert metadata_of(head(url)) == {
            "note": b"from Chromium", "filename": name.encode(), "filetype": filetype,
        }  # fmt: skip
    assert_no_page_faults(run)
    assert_screenshot(screenshot)
