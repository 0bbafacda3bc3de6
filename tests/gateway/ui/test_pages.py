"""The pages' HTTP side: strict security headers, cache headers, what is (not) served, and
sources that cannot turn text into markup (no HTML sinks, no inline code, no external hosts)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.migrate import upgrade
from gateway.ui.router import STATIC_DIR, assets
from tests.helpers.app import make_settings, running_app

# Each page and the form it opens with (the request tester needs no sign-in).
PAGES = {
    "/chat": "login-form",
    "/chat-streaming": "login-form",
    "/dashboard": "login-form",
    "/test": "request-form",
}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway (auth required, no engine) on a migrated SQLite file."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    settings = make_settings(DATABASE_URL=url, REQUIRE_AUTH=True)
    async with running_app(settings) as (_, client):
        yield client


def csp_directives(header: str) -> dict[str, list[str]]:
    """A Content-Security-Policy header as {directive: [sources]}."""
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        words = part.split()
        if words:
            directives[words[0]] = words[1:]
    return directives


def assert_strict_headers(response: httpx.Response) -> None:
    """The page's security headers."""
    csp = response.headers["content-security-policy"]
    assert "unsafe-inline" not in csp
    assert "unsafe-eval" not in csp
    assert "unsafe-hashes" not in csp
    assert "*" not in csp
    directives = csp_directives(csp)
    assert directives["default-src"] == ["'self'"]
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert directives["connect-src"] == ["'self'"]
    assert directives["img-src"] == ["'self'"]
    assert directives["object-src"] == ["'none'"]
    assert directives["base-uri"] == ["'none'"]
    assert directives["frame-ancestors"] == ["'none'"]
    # Any HTML string sink (innerHTML and friends) throws instead of parsing markup.
    assert directives["require-trusted-types-for"] == ["'script'"]
    assert directives["trusted-types"] == ["'none'"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.headers["cross-origin-opener-policy"] == "same-origin"


@pytest.mark.parametrize("path", PAGES)
async def test_pages_are_served_without_credentials_with_strict_headers(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert_strict_headers(response)
    assert response.headers["cache-control"] == "no-cache"
    # A static shell: no user data, no token, nothing about the server in it.
    assert "eyJ" not in response.text
    assert f'id="{PAGES[path]}"' in response.text
    # Revalidation: the same ETag answers 304 with no body.
    again = await client.get(path, headers={"If-None-Match": response.headers["etag"]})
    assert again.status_code == 304
    assert again.content == b""
    assert_strict_headers(again)


async def test_assets_are_versioned_and_cached(client: httpx.AsyncClient) -> None:
    page = (await client.get("/chat")).text
    referenced = re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', page)
    names = {url.split("?")[0].rsplit("/", 1)[1] for url in referenced}
    assert names == {"favicon.svg", "ui.css", "common.js", "markdown.js", "chat.js"}
    for url in referenced:
        name, version = url.removeprefix("/ui/static/").split("?v=")
        assert version == assets()[name].version
        response = await client.get(url)
        assert response.status_code == 200, url
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.content == (STATIC_DIR / name).read_bytes()
    script = await client.get("/ui/static/chat.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    # Unversioned or outdated addresses are revalidated instead of cached for a year.
    assert script.headers["cache-control"] == "no-cache"
    stale = await client.get("/ui/static/chat.js?v=0000000000000000")
    assert stale.headers["cache-control"] == "no-cache"
    css = await client.get("/ui/static/ui.css")
    assert css.headers["content-type"] == "text/css; charset=utf-8"


async def test_admin_redirects_to_the_console(client: httpx.AsyncClient) -> None:
    response = await client.get("/admin", headers={"Host": "evil.example"})
    assert response.status_code == 308
    # Relative: nothing from the Host header is echoed.
    assert response.headers["location"] == "/dashboard"


@pytest.mark.parametrize(
    "path",
    [
        "/ui/static/nope.js",
        "/ui/static/chat.html",  # pages only through their routes
        "/ui/static/..%2fapp.py",
        "/ui/static/%2e%2e/router.py",
        "/ui/static/../router.py",
        "/ui/static/.hidden",
        "/ui/static/",
        "/ui/static/sub/chat.js",
    ],
)
async def test_only_listed_assets_are_served(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.status_code in {400, 404}, f"{path}: {response.status_code}"
    assert b"import" not in response.content


# -- the sources themselves ---------------------------------------------------------------------

SOURCES = sorted(STATIC_DIR.iterdir())
SCRIPTS = [p for p in SOURCES if p.suffix == ".js"]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_scripts_never_parse_strings_as_html_or_code(path: Path) -> None:
    # Comments may name what the code avoids; the code may not use it.
    source = re.sub(r"(?m)(^|\s)//\s.*$", "", path.read_text())
    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "createContextualFragment",
        "DOMParser",
        "eval(",
        "new Function",
        'setTimeout("',
        "EventSource",  # would need the token in the URL
        "localStorage",  # tokens stay in this tab's sessionStorage
    ):
        assert sink not in source, f"{path.name} uses {sink}"


@pytest.mark.parametrize("path", PAGES)
async def test_pages_have_no_inline_code_and_no_external_resources(
    client: httpx.AsyncClient, path: str
) -> None:
    page = (await client.get(path)).text
    for script in re.findall(r"<script\b[^>]*>", page):
        assert "src=" in script, script
    for body in re.findall(r"<script\b[^>]*>([\s\S]*?)</script>", page):
        assert not body.strip(), f"inline script: {body[:80]}"
    assert "<style" not in page
    assert not re.search(r"\sstyle=", page)
    assert not re.search(r"\son[a-z]+=", page, re.IGNORECASE)
    assert not re.search(r"(?:src|href)=\"(?!/|#)", page), "a resource from elsewhere"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_nothing_is_loaded_from_another_host(path: Path) -> None:
    text = path.read_text()
    # Closed networks: no CDN, no web font, no analytics.
    for needle in ("cdn", "googleapis", "unpkg", "jsdelivr", "@import", "url(http"):
        assert needle not in text.lower(), f"{path.name}: {needle}"
