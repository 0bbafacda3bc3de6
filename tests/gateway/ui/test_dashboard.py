"""The admin console in a real browser: model switching with live progress, API keys used from
curl, and a normal user who gets no console."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, Page, Request, expect

from tests.gateway.ui.test_chat import unnamed_controls
from tests.helpers.browser import (
    BIG_PROFILE,
    GPU_SNAPSHOT,
    Gateway,
    PageProblems,
    new_page,
    screenshot,
    serve_gateway,
    sign_in,
)
from tests.helpers.profiles import simulator_command

UI = tuple[Page, PageProblems]


async def sign_in_to_console(page: Page, gateway: Gateway) -> None:
    """Sign in as the admin and wait for the engine panel."""
    await sign_in(page, gateway, "/dashboard", "admin", gateway.admin_password)
    await expect(page.get_by_role("heading", name="Engine", exact=True)).to_be_visible()


async def test_admin_switches_the_model_and_sees_progress_reach_ready(
    gateway: Gateway, ui: UI
) -> None:
    page, _ = ui
    await sign_in_to_console(page, gateway)
    engine = page.locator("#engine-figures")
    await expect(engine).to_contain_text("sim-a")
    await expect(engine.locator("[data-state]")).to_have_text("ready")
    # Profiles with their fit verdicts; the GPU section says why it is empty here.
    rows = page.locator("#profile-table tbody tr")
    await expect(rows).to_have_count(4)
    await expect(page.locator("tr[data-profile=sim-b]")).to_contain_text("fits")
    # GPU cards from the recorded dual RTX 3090 snapshot: memory and utilization meters.
    cards = page.locator("#gpu-cards article")
    await expect(cards).to_have_count(2)
    await expect(cards.first).to_contain_text("NVIDIA GeForce RTX 3090")
    await expect(cards.first).to_contain_text("°C")
    await expect(cards.first.locator("meter")).to_have_count(2)
    await expect(page.locator("#lb-figures")).to_contain_text("Local slots")

    await page.get_by_role("button", name="Switch to Simulator B").click()
    panel = page.locator("#switch-panel")
    await expect(panel).to_be_visible()
    await expect(panel.get_by_role("heading")).to_contain_text("Switch to sim-b")
    # Progress arrives from the events stream while sim-b starts (it takes a second).
    events = page.locator("#switch-events li [data-state]")
    await expect(events.filter(has_text="loading").first).to_be_visible(timeout=10_000)
    await expect(panel).to_have_attribute("data-status", "succeeded", timeout=30_000)
    await expect(events.filter(has_text="ready").first).to_be_visible()
    assert await page.locator("#switch-progress").evaluate("el => el.value") == 1
    await expect(page.locator("#switch-message")).to_have_text("Done: sim-b is ready.")
    await expect(engine).to_contain_text("sim-b")
    await expect(engine.locator("[data-state]")).to_have_text("ready")
    await expect(page.get_by_role("button", name="Switch to Simulator B")).to_be_disabled()

    status = (await gateway.as_admin("GET", "/api/models/status")).json()
    assert status["engine"]["profile_id"] == "sim-b"
    assert status["engine"]["state"] == "ready"
    assert await unnamed_controls(page) == []
    await screenshot(page, "dashboard_switch_succeeded")

    # A profile that fails to load: the switch rolls back and the engine's log tail is shown.
    await page.get_by_role("button", name="Switch to Simulator that fails to load").click()
    await expect(panel).to_have_attribute("data-status", "rolled_back", timeout=30_000)
    await expect(page.locator("#switch-message")).to_contain_text("rolled back")
    logs = page.locator("#switch-logs")
    await expect(logs).to_be_visible()
    await expect(logs).to_contain_text("out of memory")
    await expect(engine).to_contain_text("sim-b")
    await expect(engine.locator("[data-state]")).to_have_text("ready")


async def curl_chat(base_url: str, key: str) -> tuple[int, dict[str, Any]]:
    """POST /v1/chat/completions with a real curl process; (HTTP status, JSON body)."""
    curl = shutil.which("curl")
    assert curl, "curl is missing: run scripts/bootstrap-system.sh"
    body = {"model": "current", "messages": [{"role": "user", "content": "Hello!"}]}
    process = await asyncio.create_subprocess_exec(
        *(curl, "-sS", "--max-time", "20", "-w", "\n%{http_code}"),
        *("-H", f"Authorization: Bearer {key}", "-H", "Content-Type: application/json"),
        *("-d", json.dumps(body), f"{base_url}/v1/chat/completions"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    text, _, code = out.decode().rpartition("\n")
    return int(code), json.loads(text)


async def test_console_says_why_no_engine_runs(postgres_url: str, tmp_path: Path, ui: UI) -> None:
    """Production, ENGINE=auto and a default profile that does not fit: no engine (never the
    simulator), and the console shows the planner's reason, the one /health/ready gives."""
    page, _ = ui
    async with serve_gateway(postgres_url, tmp_path, default_profile=BIG_PROFILE) as gw:
        ready = await gw.client.get("/health/ready")
        assert ready.status_code == 503, ready.text
        reason = ready.json()["checks"]["engine"]["detail"]
        assert f"default profile {BIG_PROFILE} cannot run here" in reason
        await sign_in_to_console(page, gw)
        engine = page.locator("#engine-figures")
        await expect(engine.locator("[data-state]")).to_have_text("idle")
        await expect(engine).to_contain_text("Profilenone")
        not_serving = engine.locator("div").filter(has=page.locator("dt", has_text="Not serving"))
        await expect(not_serving.locator("dd")).to_have_text(reason)
        await expect(not_serving.locator("dd")).to_have_class("error")
        await screenshot(page, "dashboard_no_engine")
        # Leave the console before the gateway goes: its polling would log refused connections.
        await page.goto("about:blank")


async def test_console_shows_a_crash_loop_with_the_engine_log(
    postgres_url: str, tmp_path: Path, ui: UI
) -> None:
    """An engine that crashes soon after every start: restarted once, then a crash loop; the
    console says so, with the code, the restarts and the engine's own last lines."""
    page, _ = ui
    crashing = {
        "sim-crashing": {
            "display_name": "Simulator that crashes after start",
            "engine": "command",
            "runtime": "process",
            "served_model_name": "sim-crashing",
            "command": simulator_command("sim-crashing", "--die-after-seconds", "0.5"),
            "startup_timeout_s": 30,
        }
    }
    async with serve_gateway(
        postgres_url,
        tmp_path,
        default_profile="sim-crashing",
        extra_profiles=crashing,
        wait_ready=False,
        ENGINE_RESTART_MAX=1,
        ENGINE_RESTART_BACKOFF_S=0.1,
    ) as gw:
        await sign_in_to_console(page, gw)
        engine = page.locator("#engine-figures")
        # Followed live: the crash, the restart, the second crash.
        await expect(engine.locator("[data-state]")).to_have_text("failed", timeout=60_000)
        error = engine.locator("div").filter(has=page.locator("dt", has_text="Error"))
        await expect(error.locator("dd")).to_contain_text("crash loop: the engine crashed 2 times")
        await expect(error.locator("dd")).to_have_class("error")
        code = engine.locator("div").filter(has=page.locator("dt", has_text="Code"))
        await expect(code.locator("dd")).to_have_text("engine_crash_loop")
        restarts = engine.locator("div").filter(has=page.locator("dt", has_text="Restarts"))
        await expect(restarts.locator("dd")).to_contain_text("1 restart; 2 crashes")
        await expect(page.locator("#engine-logs-box")).to_be_visible()
        await expect(page.locator("#engine-logs")).to_contain_text(
            "--die-after-seconds 0.5 elapsed"
        )
        status = (await gw.as_admin("GET", "/api/models/status")).json()["engine"]
        assert status["failure"] == "engine_crash_loop"
        await screenshot(page, "dashboard_crash_loop")
        # Leave the console before the gateway goes: its polling would log refused connections.
        await page.goto("about:blank")


async def test_create_a_key_use_it_with_curl_then_revoke_it(gateway: Gateway, ui: UI) -> None:
    page, _ = ui
    await sign_in_to_console(page, gateway)
    await page.get_by_label("User or service").fill(gateway.user_name)
    await page.get_by_label("Tier", exact=True).select_option("premium")
    await page.get_by_label("Description").fill("laptop <b>key</b>")
    await page.get_by_role("button", name="Create key").click()

    shown = page.get_by_role("textbox", name="New API key")
    await expect(page.locator("#new-key")).to_be_visible()
    key = await shown.input_value()
    assert key.startswith("sk-vcg-"), key
    row = page.locator("#key-table tbody tr").filter(has_text=gateway.user_name)
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("laptop <b>key</b>")
    listed = (await gateway.as_admin("GET", "/admin/api/keys")).json()["data"]
    assert len(listed) == 1
    assert key.startswith(listed[0]["prefix"])
    assert listed[0]["username"] == gateway.user_name
    assert listed[0]["tier"] == "premium"
    await expect(row.locator("td code")).to_have_text(listed[0]["prefix"] + "…")
    await expect(row).to_contain_text("active")
    await screenshot(page, "dashboard_new_key_shown_once")

    status, reply = await curl_chat(gateway.base_url, key)
    assert status == 200, reply
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"]

    # "Done" clears the key from the page: it is not shown again, also not after a reload.
    await page.get_by_role("button", name="Done").click()
    await expect(page.locator("#new-key")).to_be_hidden()
    await page.reload()
    await expect(row).to_have_count(1)
    assert key not in await page.content()

    # Tier changes through the table; then revoke (confirmed) and the key stops working.
    await row.get_by_role("combobox").select_option("free")
    await expect(page.locator("#status-line")).to_contain_text("updated")
    keys = (await gateway.as_admin("GET", "/admin/api/keys")).json()["data"]
    assert [k["tier"] for k in keys] == ["free"]
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await row.get_by_role("button", name="Revoke").click()
    await expect(row).to_contain_text("revoked")
    status, reply = await curl_chat(gateway.base_url, key)
    assert status == 401, reply
    assert reply["error"]["type"] == "authentication_error"


async def test_a_normal_user_gets_no_admin_console(gateway: Gateway, browser: Browser) -> None:
    context, page, problems = await new_page(browser)
    api_calls: list[str] = []

    def record(request: Request) -> None:
        if "/api/" in request.url or "/lb/" in request.url:
            api_calls.append(request.url.removeprefix(gateway.base_url))

    page.on("request", record)
    try:
        # Seed 002's address leads to the console's sign-in.
        await page.goto(gateway.url("/admin"))
        assert page.url == gateway.url("/dashboard")
        form = page.locator("#login-form")
        await form.get_by_label("Username").fill(gateway.user_name)
        await form.get_by_label("Password").fill(gateway.user_password)
        await form.get_by_role("button", name="Sign in").click()
        await expect(page.get_by_role("heading", name="Administrators only")).to_be_visible()
        await expect(page.locator("#dashboard-view")).to_be_hidden()
        await expect(page.locator("#forbidden-user")).to_have_text(gateway.user_name)
        await screenshot(page, "dashboard_as_a_normal_user")
        # The page asked for nothing of the admin API...
        assert api_calls == ["/api/auth/login", "/api/auth/me"], api_calls
        # ...and the admin API refuses this user anyway, whatever a page would do.
        for path in (
            "/admin/api/keys",
            "/admin/api/users",
            "/admin/api/usage",
            "/api/models/status",
            "/api/models/profiles",
            "/api/gpus",
        ):
            response = await gateway.as_user("GET", path)
            assert response.status_code == 403, f"{path}: {response.text}"
        switch = await gateway.as_user("POST", "/api/models/switch", json={"profile_id": "sim-b"})
        assert switch.status_code == 403
        # The chat is theirs, and it shows no link to the console.
        await page.get_by_role("link", name="Go to the chat").click()
        await expect(page.get_by_role("textbox", name="Message")).to_be_visible()
        await expect(page.get_by_role("link", name="Admin console")).to_be_hidden()
    finally:
        await context.close()
    assert not problems.errors


async def test_console_lists_users_and_usage(gateway: Gateway, ui: UI) -> None:
    page, _ = ui
    # Some traffic to chart: two requests by alice with her login, one with an API key of hers.
    chat = {"model": "current", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        response = await gateway.as_user("POST", "/v1/chat/completions", json=chat)
        assert response.status_code == 200, response.text
    key = (await gateway.as_user("POST", "/api/keys", json={"description": "usage"})).json()
    response = await gateway.client.post(
        "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {key['key']}"}
    )
    assert response.status_code == 200, response.text
    await sign_in_to_console(page, gateway)
    users = page.locator("#user-table tbody tr")
    await expect(users).to_have_count(2)
    await page.get_by_label("New user's name").fill("bob")
    await page.get_by_label("New user's password").fill("bob-Pass-for-ui-tests-77")
    await page.get_by_role("button", name="Create user").click()
    await expect(users).to_have_count(3)
    bob = users.filter(has_text="bob")
    await bob.get_by_role("combobox", name="Tier of bob").select_option("premium")
    await expect(page.locator("#status-line")).to_have_text("bob updated.")
    listed = (await gateway.as_admin("GET", "/admin/api/users")).json()["data"]
    assert {u["username"]: u["tier"] for u in listed}["bob"] == "premium"

    for _ in range(100):  # usage is recorded in batches off the request path
        report = (await gateway.as_admin("GET", "/admin/api/usage?days=7")).json()
        if report["totals"]["requests"] >= 3:
            break
        await asyncio.sleep(0.1)
    await page.get_by_label("Period").select_option("30")
    await expect(page.locator("#usage-totals")).to_contain_text("Requests")
    await expect(page.locator("#usage-days-chart svg rect.bar")).to_have_count(30)
    await expect(page.locator("#usage-models")).to_contain_text("sim-a")
    await expect(page.locator("#usage-users")).to_contain_text(gateway.user_name)
    # Usage per key: the key's own row (its prefix, one request), apart from the login's two.
    key_rows = page.locator("#usage-keys tbody tr")
    key_row = key_rows.filter(has_text=key["prefix"] + "…")
    await expect(key_row).to_have_count(1)
    await expect(key_row.locator("td").nth(1)).to_have_text("1")
    login_row = key_rows.filter(has_text="(login or none)")
    await expect(login_row.locator("td").nth(1)).to_have_text("2")
    await page.locator("#usage").scroll_into_view_if_needed()


async def test_console_fits_a_phone(gateway: Gateway, browser: Browser) -> None:
    context, page, problems = await new_page(browser, width=390, height=844)
    try:
        await sign_in_to_console(page, gateway)
        await expect(page.locator("#gpu-cards article")).to_have_count(2)
        await expect(page.locator("#profile-table tbody tr")).to_have_count(4)
        await expect(page.locator("#user-table tbody tr")).to_have_count(2)
        # Wide tables scroll inside their section; the page itself does not scroll sideways.
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await screenshot(page, "dashboard_phone_width")
        assert await unnamed_controls(page) == []
    finally:
        await context.close()
    assert not problems.errors


def format_bytes(value: int) -> str:
    """common.js formatBytes: GiB with one decimal from 1 GiB up, else whole MiB."""
    gib = value / 1024**3
    return f"{gib:.1f} GiB" if gib >= 1 else f"{value / 1024**2:.0f} MiB"


def js_round(value: float) -> int:
    """JavaScript's Math.round (half up), not Python's round (half to even)."""
    return math.floor(value + 0.5)


async def test_gpu_cards_show_memory_utilization_temperature_and_power(
    gateway: Gateway, ui: UI
) -> None:
    page, _ = ui
    snapshot = json.loads(GPU_SNAPSHOT.read_text())
    await sign_in_to_console(page, gateway)
    cards = page.locator("#gpu-cards article")
    await expect(cards).to_have_count(len(snapshot["gpus"]))
    assert len(snapshot["gpus"]) == 2
    source = page.locator("#gpu-source")
    await expect(source).to_contain_text(f"2 GPU(s), read from snapshot:{GPU_SNAPSHOT}")
    await expect(source).to_contain_text(f"driver {snapshot['driver_version']}")
    for gpu in snapshot["gpus"]:
        card = page.get_by_role("article", name=f"GPU {gpu['index']}", exact=True)
        await expect(card.get_by_role("heading")).to_have_text(
            f"GPU {gpu['index']} · {gpu['name']}"
        )
        used, total = gpu["memory_used_bytes"], gpu["memory_total_bytes"]
        await expect(card).to_contain_text(f"Memory {format_bytes(used)} of {format_bytes(total)}")
        memory = card.get_by_role("meter", name="Memory")
        assert await memory.evaluate("el => [el.value, el.max]") == [used, total]
        await expect(card).to_contain_text(f"Utilization {gpu['utilization_percent']}%")
        utilization = card.get_by_role("meter", name="Utilization")
        assert await utilization.evaluate("el => el.value") == gpu["utilization_percent"]
        figures = card.locator("dl div")
        await expect(figures.filter(has_text="Temperature").locator("dd")).to_have_text(
            f"{gpu['temperature_c']} °C"
        )
        power = f"{js_round(gpu['power_draw_w'])} / {js_round(gpu['power_limit_w'])} W"
        await expect(figures.filter(has_text="Power").locator("dd")).to_have_text(power)
        await expect(figures.filter(has_text="Processes").locator("dd")).to_have_text(
            str(len(gpu["processes"]))
        )
    # The profile too big for these two cards says so, with why, and cannot be switched to.
    big = page.locator(f"tr[data-profile='{BIG_PROFILE}']")
    await expect(big.locator(".fit-does_not_fit")).to_have_text("does not fit")
    await expect(big).to_contain_text("GiB")
    switch = big.get_by_role("button", name="Switch to Llama 3 70B (too big)")
    await expect(switch).to_be_disabled()
    # Its long reasons do not squeeze the button's label onto several lines.
    one_line = await page.get_by_role("button", name="Create key").bounding_box()
    squeezed = await switch.bounding_box()
    assert one_line is not None
    assert squeezed is not None
    assert squeezed["height"] <= one_line["height"] + 2, (squeezed, one_line)
    await page.locator("#gpu-cards").scroll_into_view_if_needed()


async def test_a_key_created_with_an_expiry_shows_it_in_the_list(gateway: Gateway, ui: UI) -> None:
    page, _ = ui
    # The list shows the UTC date of expires_at (the form sends the end of that UTC day).
    expires = (datetime.now(UTC).date() + timedelta(days=30)).isoformat()
    await sign_in_to_console(page, gateway)
    await page.get_by_label("User or service").fill(gateway.user_name)
    await page.get_by_label("Description").fill("expiring key")
    await page.get_by_label("Expires (optional)").fill(expires)
    await page.get_by_role("button", name="Create key").click()
    await expect(page.locator("#new-key")).to_be_visible()
    listed = (await gateway.as_admin("GET", "/admin/api/keys")).json()["data"]
    assert len(listed) == 1
    assert listed[0]["expires_at"].startswith(expires), listed[0]
    name = listed[0]["prefix"] + "…"
    row = page.locator("#key-table tbody tr").filter(has_text="expiring key")
    expiry = row.get_by_label(f"Expiry of key {name}")
    await expect(expiry).to_have_value(expires)
    await expect(expiry).to_be_visible()
    await expect(row).to_contain_text("active")
    # Changed from the list, the new expiry is stored and shown after a reload.
    later = (datetime.now(UTC).date() + timedelta(days=90)).isoformat()
    await expiry.fill(later)
    await expect(page.locator("#status-line")).to_contain_text("updated")
    await page.reload()
    await expect(row.get_by_label(f"Expiry of key {name}")).to_have_value(later)
    stored = (await gateway.as_admin("GET", "/admin/api/keys")).json()["data"][0]
    assert stored["expires_at"].startswith(later), stored
    await page.locator("#keys").scroll_into_view_if_needed()
