"""The dashboard at `/` and the API docs at `/docs` and `/redoc`, all served from files in the package.

The dashboard is static: `ui/index.html` and its ES modules call the public API with the user's key (an
`Authorization: Bearer` header, never a URL), so it sees exactly what that key may see. Its responses carry a strict
Content-Security-Policy (no inline script, nothing from another origin). Swagger UI and ReDoc come from the
`fastapi-offline` package's copies, so the docs work without a network.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.responses import HTMLResponse, Response

from batchyard.errors import NotFound

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
UI_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
# /docs and /redoc: FastAPI's pages start the viewer with one inline script, allowed by its hash; the viewers style
# themselves inline. Nothing may come from another origin (ReDoc's sidebar shows a logo from its CDN: refused, hidden).
DOCS_CSP = (
    "default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)
INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
DOCS_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def _ui_files() -> dict[str, tuple[bytes, str]]:
    """Every dashboard asset, read once: name -> (bytes, media type)."""
    folder = resources.files("batchyard.api").joinpath("ui")
    files: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), MEDIA_TYPES[suffix])
    return files


def _docs_files() -> dict[str, tuple[bytes, str]]:
    return {name: ((DOCS_ASSETS / name).read_bytes(), MEDIA_TYPES[Path(name).suffix]) for name in DOCS_FILES}


def _offline(page: HTMLResponse) -> HTMLResponse:
    """A docs page with a CSP that lets only its own inline script and this server's files run or load."""
    digests = [hashlib.sha256(m.group(1)).digest() for m in INLINE_SCRIPT.finditer(bytes(page.body))]
    hashes = " ".join(f"'sha256-{base64.b64encode(d).decode()}'" for d in digests)
    page.headers["Content-Security-Policy"] = DOCS_CSP.format(hashes=hashes)
    page.headers["X-Content-Type-Options"] = "nosniff"
    return page


def _no_such_asset(name: str) -> NotFound:
    return NotFound(f"No such asset: {name[:64]!r}.", code="not_found")


def install(app: FastAPI) -> None:
    """Add the dashboard (`/`, `/ui/*`) and the offline docs (`/docs`, `/redoc`, `/docs-assets/*`) to `app`
    (created with `docs_url=None, redoc_url=None`)."""
    ui = _ui_files()
    docs = _docs_files()
    openapi_url = app.openapi_url or "/openapi.json"

    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        body, media_type = ui["index.html"]
        return Response(body, media_type=media_type, headers=UI_HEADERS)

    @app.get("/ui/{name}", include_in_schema=False)
    async def ui_asset(name: str) -> Response:
        if name not in ui:
            raise _no_such_asset(name)
        body, media_type = ui[name]
        return Response(body, media_type=media_type, headers=UI_HEADERS)

    @app.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(name: str) -> Response:
        if name not in docs:
            raise _no_such_asset(name)
        body, media_type = docs[name]
        return Response(
            body,
            media_type=media_type,
            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
        )

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
            # no badge that asks validator.swagger.io about the document
            swagger_ui_parameters={"validatorUrl": None},
        )
        return _offline(page)

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return _offline(get_swagger_ui_oauth2_redirect_html())

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        )
        return _offline(page)
