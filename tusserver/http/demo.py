"""The demo upload page: Uppy's Dashboard with its tus uploader, at `/`, and beside it a plain
HTML form (no JavaScript needed) that posts files to the endpoint as a form upload.

The page and its vendored Uppy bundle are static files inside the package (tusserver/http/static/,
rebuilt by scripts/build-demo-page.sh), so the page needs neither Node nor the network. It is
served without a token in every mode: it holds no data, and in secured mode it reads the
token from the URL fragment in the browser (see static/demo.js). The plain form's `redirect`
field brings the browser back to the page (303, `?uploads=<id>,...`); it is filled in for each
request, since it must be absolute and name the origin the visitor sees.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from tusserver.errors import TusError
from tusserver.http.handlers import location_of
from tusserver.http.keys import SETTINGS
from tusserver.http.middleware import expect_handler
from tusserver.settings import Settings

log = logging.getLogger("tusserver")

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/static/"
REDIRECT_FIELD = "{{redirect-field}}"


def page_headers(settings: Settings) -> dict[str, str]:
    """The page talks to the tus endpoint of any origin (the `endpoint` setting of demo.js),
    keeps Uppy's inline styles and thumbnails (blob:), and may not be framed; its plain form
    posts to this server only (its own origin, or --public-url's)."""
    form_action = "'self'"
    if settings.public_url:
        form_action += f" {URL(settings.public_url).origin()}"
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data: blob:; media-src 'self' blob:; connect-src * blob:; "
            f"worker-src 'self' blob:; base-uri 'none'; form-action {form_action}; "
            "frame-ancestors 'none'"
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


def page_url(request: web.Request) -> str | None:
    """The page's absolute URL as the visitor sees it (the endpoint's URL less the base
    path: --public-url, or the allowed Host); None for a Host this server makes no URLs for
    (a form posted from there is refused anyway)."""
    try:
        endpoint = location_of(request).removesuffix("{id}")
    except TusError:
        return None
    base_path = request.app[SETTINGS].base_path
    if endpoint.endswith(base_path):
        return endpoint.removesuffix(base_path) + "/"
    return f"{URL(endpoint).origin()}/"


def redirect_field(url: str | None) -> str:
    """The plain form's hidden `redirect` input, back to `url`; none without a URL (the form
    is then answered with JSON)."""
    if url is None:
        return ""
    return f'<input type="hidden" name="redirect" value="{html.escape(url, quote=True)}">'


def page_handler(settings: Settings) -> Handler:
    """The handler of GET / (and HEAD): the page, rendered once for these settings, with the
    plain form's `redirect` field filled in for each request."""
    body = render_page((STATIC_DIR / "index.html").read_text(encoding="utf-8"), settings)
    headers = page_headers(settings)

    async def page(request: web.Request) -> web.Response:
        text = body.replace(REDIRECT_FIELD, redirect_field(page_url(request)))
        return web.Response(text=text, content_type="text/html", headers=headers)

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
