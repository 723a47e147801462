"""The demo upload page: Uppy's Dashboard with its tus uploader, at `/`.

The page and its vendored Uppy bundle are static files inside the package (tusserver/http/static/,
rebuilt by scripts/build-demo-page.sh), so the page needs neither Node nor the network. It is
served without a token in every mode: it holds no data, and in secured mode it reads the
token from the URL fragment in the browser (see static/demo.js).
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from tusserver.http.middleware import expect_handler
from tusserver.settings import Settings

log = logging.getLogger("tusserver")

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"
# The page talks to the tus endpoint of any origin (the `endpoint` setting of demo.js), keeps
# Uppy's inline styles and thumbnails (blob:), and may not be framed.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; media-src 'self' blob:; connect-src * blob:; "
        "worker-src 'self' blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def render_page(template: str, settings: Settings) -> str:
    """The page with this server's endpoint (relative unless --public-url) filled in."""
    endpoint = settings.public_url or settings.base_path
    values = {
        "endpoint": endpoint,
        "secured": "true" if settings.is_secured else "false",
        "static": STATIC_PREFIX.lstrip("/"),  # relative: works behind a path prefix too
    }
    for name, value in values.items():
        template = template.replace("{{" + name + "}}", html.escape(value, quote=True))
    return template


def page_handler(settings: Settings) -> Handler:
    """The handler of GET / (and HEAD): the page, rendered once for these settings."""
    body = render_page((STATIC_DIR / "index.html").read_text(encoding="utf-8"), settings)

    async def page(request: web.Request) -> web.Response:
        return web.Response(text=body, content_type="text/html", headers=PAGE_HEADERS)

    return page


def add_demo_routes(app: web.Application, settings: Settings) -> None:
    """Serve the demo page at / and its files under /static/ when the settings ask for it."""
    if not settings.shows_demo_page:
        return
    if settings.base_path in ("/", STATIC_PREFIX):
        log.warning("no demo page: the tus endpoint is at %s", settings.base_path)
        return
    if not (STATIC_DIR / "vendor" / "uppy" / "uppy.min.js").is_file():
        log.warning("no demo page: its files are missing from %s", STATIC_DIR)
        return
    app.router.add_get("/", page_handler(settings), name="demo-page", expect_handler=expect_handler)
    app.router.add_static(
        STATIC_PREFIX, STATIC_DIR, name="demo-static", expect_handler=expect_handler
    )
