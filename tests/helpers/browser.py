"""Browser tests: a served gateway, Chromium through Playwright, page helpers."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from playwright.async_api import Browser, BrowserContext, ConsoleMessage, Page

from gateway.migrate import upgrade
from tests.helpers.app import engine_headers, make_settings, served_app
from tests.helpers.paths import REPO
from tests.helpers.profiles import llama_70b, simulator_command

ARTIFACTS = REPO / "test-artifacts" / "ui"


CHROMIUM = Path(os.environ.get("VCG_CHROMIUM", "/usr/bin/chromium"))


# ENVIRONMENT.md: how Debian's chromium runs headless as root here.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


ADMIN_PASSWORD = "adm1n-Pass-for-ui-tests-5d1a"


USER_NAME = "alice"


USER_PASSWORD = "alice-Pass-for-ui-tests-8c3f"


# sim-a streams 60 words at 25 words/s (a reply takes ~2.4 s: long enough to watch it arrive
# and to stop it); sim-b takes a second to start so that a switch has progress to show.
REPLY_WORDS = 60


# A vLLM profile that does not fit the recorded GPUs (see ui_profiles).
BIG_PROFILE = "llama-3-70b"


GPU_SNAPSHOT = REPO / "tests" / "fixtures" / "gpu" / "dual_rtx3090.json"


def ui_profiles() -> dict[str, Any]:
    """Model profiles of engine simulators for the browser tests."""

    return {
        "default": "sim-a",
        "profiles": {
            "sim-a": {
                "display_name": "Simulator A",
                "engine": "command",
                "runtime": "process",
                "served_model_name": "sim-a",
                "command": simulator_command(
                    "sim-a",
                    *("--tokens-per-second", "25", "--response-tokens", str(REPLY_WORDS)),
                ),
                "startup_timeout_s": 30,
            },
            "sim-b": {
                "display_name": "Simulator B",
                "engine": "command",
                "runtime": "process",
                "served_model_name": "sim-b",
                "command": simulator_command("sim-b", "--startup-delay", "1.0"),
                "startup_timeout_s": 30,
            },
            "sim-broken": {
                "display_name": "Simulator that fails to load",
                "engine": "command",
                "runtime": "process",
                "served_model_name": "sim-broken",
                "command": simulator_command("sim-broken", "--fail-at-start"),
                "startup_timeout_s": 30,
            },
            BIG_PROFILE: llama_70b(BIG_PROFILE),
        },
    }


@dataclass
class Gateway:
    """A served gateway with an admin and a normal user."""

    base_url: str
    client: httpx.AsyncClient = field(repr=False)
    # The engine's API key changes at every start: read it from the app when it is needed.
    engine_headers: Callable[[], dict[str, str]] = field(repr=False)
    admin_token: str
    user_token: str
    admin_password: str = ADMIN_PASSWORD
    user_name: str = USER_NAME
    user_password: str = USER_PASSWORD

    def url(self, path: str) -> str:
        """An absolute URL on the gateway."""
        return self.base_url + path

    async def as_user(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call the API as the normal user."""
        headers = {"Authorization": f"Bearer {self.user_token}"}
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def as_admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call the API as the admin."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        return await self.client.request(method, path, headers=headers, **kwargs)

    async def simulator_stats(self) -> dict[str, Any]:
        """The running engine simulator's own counters (`GET /simulator/stats` on the engine,
        not through the gateway): what the engine saw, whatever the gateway says."""
        status = (await self.as_admin("GET", "/api/models/status")).json()
        engine_url = status["engine"]["engine_url"]
        assert engine_url, status
        async with httpx.AsyncClient(
            base_url=engine_url, timeout=10, trust_env=False, headers=self.engine_headers()
        ) as engine:
            response = await engine.get("/simulator/stats")
        assert response.status_code == 200, response.text
        return dict(response.json())


async def _login(client: httpx.AsyncClient, username: str, password: str) -> str:
    response = await client.post(
        "/api/auth/login", json={"username": username, "password": password}
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


@asynccontextmanager
async def serve_gateway(
    postgres_url: str,
    tmp_path: Path,
    *,
    default_profile: str = "sim-a",
    extra_profiles: dict[str, Any] | None = None,
    wait_ready: bool = True,
    **overrides: Any,
) -> AsyncIterator[Gateway]:
    """The gateway on Postgres with an admin and the user alice, once the default profile is
    ready (unless `wait_ready` is off); with a default that does not fit (production: no engine
    is started), at once. `extra_profiles` join ui_profiles(); `overrides` are settings."""
    await asyncio.to_thread(upgrade, postgres_url)
    profiles = tmp_path / "model_profiles.yml"
    shipped = ui_profiles()
    shipped["profiles"].update(extra_profiles or {})
    profiles.write_text(yaml.safe_dump({**shipped, "default": default_profile}))
    settings = make_settings(
        DATABASE_URL=postgres_url,
        REQUIRE_AUTH=True,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        LOGIN_RATE_LIMIT_PER_MINUTE=10_000,
        ENGINE="auto",
        MODEL_PROFILES=str(profiles),
        # A recorded dual RTX 3090 host: the console shows GPU cards on a machine without GPUs.
        GPU_SNAPSHOT=str(GPU_SNAPSHOT),
        **overrides,
    )
    async with (
        served_app(settings) as (app, base_url),
        httpx.AsyncClient(base_url=base_url, timeout=30, trust_env=False) as client,
    ):
        admin_token = await _login(client, "admin", ADMIN_PASSWORD)
        admin = {"Authorization": f"Bearer {admin_token}"}
        created = await client.post(
            "/admin/api/users",
            json={"username": USER_NAME, "password": USER_PASSWORD, "role": "user"},
            headers=admin,
        )
        assert created.status_code == 201, created.text
        if default_profile != BIG_PROFILE and wait_ready:
            for _ in range(600):
                status = (await client.get("/api/models/status", headers=admin)).json()
                if status["engine"]["state"] == "ready":
                    break
                await asyncio.sleep(0.05)
            assert status["engine"]["state"] == "ready", status
        yield Gateway(
            base_url=base_url,
            client=client,
            engine_headers=lambda: engine_headers(app),
            admin_token=admin_token,
            user_token=await _login(client, USER_NAME, USER_PASSWORD),
        )


@dataclass
class PageProblems:
    """What the page complained about: uncaught errors and console errors (CSP violations)."""

    errors: list[str] = field(default_factory=list)

    def console(self, message: ConsoleMessage) -> None:
        """Console hook."""
        if message.type == "error":
            self.errors.append(f"console: {message.text}")

    def page_error(self, error: Exception) -> None:
        """Uncaught exception hook."""
        self.errors.append(f"uncaught: {error}")


# Errors a test provokes on purpose (a 401/403 the page handles) are not problems of the page.
EXPECTED_CONSOLE = re.compile(
    r"Failed to load resource: the server responded with a status of 4\d\d"
)


async def new_page(
    browser: Browser, *, width: int = 1280, height: int = 800
) -> tuple[BrowserContext, Page, PageProblems]:
    """A fresh context (no storage shared with other pages) and a page in it."""
    context = await browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(15_000)
    page = await context.new_page()
    problems = PageProblems()
    page.on("console", problems.console)
    page.on("pageerror", problems.page_error)
    return context, page, problems


async def screenshot(page: Page, name: str) -> Path:
    """Save a full-page screenshot as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.png"
    if not page.is_closed():
        await page.screenshot(path=str(path), full_page=True)
    return path


async def sign_in(page: Page, gateway: Gateway, path: str, username: str, password: str) -> None:
    """Open a page and sign in through its form."""
    await page.goto(gateway.url(path))
    form = page.locator("#login-form")
    await form.get_by_label("Username").fill(username)
    await form.get_by_label("Password").fill(password)
    await form.get_by_role("button", name="Sign in").click()
