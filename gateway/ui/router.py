"""/chat, /dashboard (and /admin), /ui/static/*: the browser pages, with strict security headers.

The pages are static shells with no user data in them: everything they show is fetched by their
scripts from the JSON API with the signed-in user's token, so serving them needs no credentials.
Nothing here renders HTML from data; the scripts build DOM nodes with textContent only, and the
Content-Security-Policy below (no inline script, Trusted Types required) makes an HTML string sink
an error instead of a way in.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from starlette.responses import RedirectResponse, Response

from gateway.errors import GatewayError

router = APIRouter(tags=["web ui"], include_in_schema=False)

STATIC_DIR = Path(__file__).parent / "static"
STATIC_PREFIX = "/ui/static/"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "font-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    )
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
}

# Pages are revalidated every time (a new release shows at once); assets are addressed by their
# content hash, so a matching `?v=` may be cached for a year.
PAGE_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=31536000, immutable"

_MEDIA_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
    ".html": "text/html; charset=utf-8",
}
_ASSET_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# `{{asset:name}}` in a page becomes the asset's versioned URL.
_ASSET_REF = re.compile(r"\{\{asset:([a-z0-9][a-z0-9._-]*)\}\}")
PAGES = {"chat": "chat.html", "dashboard": "dashboard.html", "test": "test.html"}


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file as served: body, media type, strong ETag and content version."""

    body: bytes
    media_type: str
    etag: str
    version: str


def _static_file(body: bytes, media_type: str) -> StaticFile:
    digest = hashlib.sha256(body).hexdigest()
    return StaticFile(
        body=body, media_type=media_type, etag=f'"{digest[:32]}"', version=digest[:16]
    )


@cache
def assets() -> dict[str, StaticFile]:
    """Every servable asset of static/ by file name (HTML pages are served by their routes)."""
    found: dict[str, StaticFile] = {}
    for path in sorted(STATIC_DIR.iterdir()):
        media_type = _MEDIA_TYPES.get(path.suffix)
        if not path.is_file() or media_type is None or path.suffix == ".html":
            continue
        found[path.name] = _static_file(path.read_bytes(), media_type)
    return found


@cache
def page(name: str) -> StaticFile:
    """A page with its asset references replaced by versioned URLs."""
    table = assets()

    def versioned(match: re.Match[str]) -> str:
        asset = table[match.group(1)]  # a missing asset is a packaging bug: fail loudly
        return f"{STATIC_PREFIX}{match.group(1)}?v={asset.version}"

    text = (STATIC_DIR / PAGES[name]).read_text(encoding="utf-8")
    return _static_file(_ASSET_REF.sub(versioned, text).encode(), _MEDIA_TYPES[".html"])


def _serve(request: Request, file: StaticFile, cache_control: str) -> Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": cache_control, "ETag": file.etag}
    if file.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(content=file.body, media_type=file.media_type, headers=headers)


@router.get("/chat")
async def chat_page(request: Request) -> Response:
    """The chat: sign in, conversations, streaming replies."""
    return _serve(request, page("chat"), PAGE_CACHE)


@router.get("/chat-streaming")
async def chat_streaming_page(request: Request) -> Response:
    """Seed 000's address of the streaming chat: the same page as /chat."""
    return _serve(request, page("chat"), PAGE_CACHE)


@router.get("/test")
async def test_page(request: Request) -> Response:
    """Seed 000's test page: send a request to any route of this gateway and see the raw
    response (status, headers, body), for people who do not use curl."""
    return _serve(request, page("test"), PAGE_CACHE)


@router.get("/dashboard")
async def dashboard_page(request: Request) -> Response:
    """The admin console: engine, GPUs, profiles, keys, users, usage (admins only)."""
    return _serve(request, page("dashboard"), PAGE_CACHE)


@router.get("/admin")
async def admin_redirect() -> Response:
    """Seed 002's admin address: the console lives at /dashboard."""
    # A relative Location: nothing from the request's Host header is echoed back.
    return RedirectResponse("/dashboard", status_code=308, headers=SECURITY_HEADERS)


@router.get(STATIC_PREFIX + "{asset}")
async def static_asset(
    request: Request,
    asset: Annotated[str, PathParam(pattern=_ASSET_NAME)],
    v: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    """A script, style sheet or icon of the pages; `?v=` the content hash makes it cacheable."""
    file = assets().get(asset)
    if file is None:
        raise GatewayError(404, "No such file.", code="not_found")
    return _serve(request, file, ASSET_CACHE if v == file.version else PAGE_CACHE)
