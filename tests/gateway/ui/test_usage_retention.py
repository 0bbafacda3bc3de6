"""The console's usage view in a real browser shows the same figures before and after old usage
rows are rolled up into daily totals and deleted."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from playwright.async_api import Page, expect
from sqlalchemy import func, select

from gateway.db import create_engine, create_session_factory, utcnow
from gateway.usage.models import UsageRecord
from gateway.usage.retention import prune_usage
from tests.helpers.browser import BIG_PROFILE, PageProblems, serve_gateway, sign_in

UI = tuple[Page, PageProblems]
VIEWS = ("#usage-totals", "#usage-days-chart", "#usage-models", "#usage-keys", "#usage-users")


async def usage_view(page: Page) -> dict[str, str]:
    """What the console shows of a year of usage: every figure, table and chart bar."""
    bars = page.locator("#usage-days-chart svg rect.bar")
    # Through another period first: each change fetches the report anew.
    await page.get_by_label("Period").select_option("7")
    await expect(bars).to_have_count(7)
    await page.get_by_label("Period").select_option("365")
    await expect(bars).to_have_count(365)
    await expect(page.locator("#usage-models")).to_contain_text("old-model")
    view = {name: await page.locator(name).inner_html() for name in VIEWS}
    view["totals"] = await page.locator("#usage-totals").inner_text()
    return view


async def test_the_console_shows_the_same_year_after_old_rows_are_rolled_up(
    postgres_url: str, tmp_path: Path, ui: UI
) -> None:
    page, _ = ui
    async with serve_gateway(postgres_url, tmp_path, default_profile=BIG_PROFILE) as gw:
        users = (await gw.as_admin("GET", "/admin/api/users")).json()["data"]
        alice = next(u["id"] for u in users if u["username"] == gw.user_name)
        engine = create_engine(postgres_url)
        sessions = create_session_factory(engine)
        try:
            now = utcnow()
            async with sessions() as session:
                session.add_all(
                    UsageRecord(
                        created_at=now - timedelta(days=days, hours=n),
                        user_id=alice, endpoint="/v1/chat/completions", model="old-model",
                        status_code=500 if n == 0 else 200, duration_ms=100 * (n + 1),
                        prompt_tokens=10 * n, completion_tokens=n, route="local",
                    )
                    for days in (40, 100, 200)
                    for n in range(3)
                )  # fmt: skip
                await session.commit()
            await sign_in(page, gw, "/dashboard", "admin", gw.admin_password)
            before = await usage_view(page)
            assert "9" in before["totals"]

            moved = await prune_usage(sessions, retention_days=30, batch_size=4)
            async with sessions() as session:
                left = await session.scalar(select(func.count()).select_from(UsageRecord))
            after = await usage_view(page)
        finally:
            await engine.dispose()
        # Leave the console before the gateway goes: its polling would log refused connections.
        await page.goto("about:blank")
    assert moved == 9
    assert left == 0
    assert after == before
