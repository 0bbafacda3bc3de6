"""Fixtures of this folder (helpers in tests/helpers/browser.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.helpers.browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    EXPECTED_CONSOLE,
    Gateway,
    PageProblems,
    new_page,
    screenshot,
    serve_gateway,
)


@pytest.fixture
async def gateway(postgres_url: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    """The gateway on Postgres with sim-a loaded, an admin and the user alice."""
    async with serve_gateway(postgres_url, tmp_path) as served:
        yield served


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium, headless, started once for the session."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: the browser tests need Debian's chromium. "
            "Run scripts/bootstrap-system.sh (as root) to install it; never `playwright install`.",
            pytrace=False,
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def ui(
    browser: Browser, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Page, PageProblems]]:
    """A desktop-sized page; a screenshot is saved afterwards, and the page must not have
    thrown or logged an error (a CSP violation is logged as one)."""
    context, page, problems = await new_page(browser)
    try:
        yield page, problems
    finally:
        await screenshot(page, request.node.name)
        await context.close()
    unexpected = [e for e in problems.errors if not EXPECTED_CONSOLE.search(e)]
    assert not unexpected, unexpected
