"""The fleet in a real browser: the console's GPU map and engines table with their load, unload,
sleep and wake buttons, and the chat's picker saying what a request for each model will meet."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Locator, Page, expect

from tests.gateway.ui.test_chat import unnamed_controls
from tests.helpers.browser import (
    BIG_PROFILE,
    Gateway,
    PageProblems,
    new_page,
    screenshot,
    serve_gateway,
    sign_in,
)
from tests.helpers.polling import eventually

UI = tuple[Page, PageProblems]

# A small model's shape (Qwen2.5-0.5B): the planner sizes and places a simulator that stands in
# for it, so that it claims GPU memory of the recorded dual RTX 3090 host.
SMALL_ARCHITECTURE = {
    "params_b": 0.494,
    "layers": 24,
    "attention_heads": 14,
    "kv_heads": 2,
    "head_dim": 64,
    "hidden_size": 896,
    "max_context": 4096,
}


def gpu_simulator(name: str) -> dict[str, Any]:
    """The engine simulator placed as a small GPU model, with sleep mode (level 1)."""
    return {
        "display_name": f"GPU simulator {name}",
        "engine": "simulator",
        "runtime": "process",
        "served_model_name": name,
        "architecture": dict(SMALL_ARCHITECTURE),  # a copy: YAML anchors are refused
        "sleep_level": 1,
        "startup_timeout_s": 30,
    }


FLEET_PROFILES = {"gpu-a": gpu_simulator("gpu-a"), "gpu-b": gpu_simulator("gpu-b")}


@pytest.fixture
async def fleet(postgres_url: str, tmp_path: Path) -> AsyncIterator[Gateway]:
    """A gateway with two GPU simulator profiles, gpu-a (the default) loaded and gpu-b not."""
    async with serve_gateway(
        postgres_url, tmp_path, default_profile="gpu-a", extra_profiles=FLEET_PROFILES
    ) as served:
        yield served


def gib(value: int) -> str:
    """The map's labels: GiB with one decimal, whatever the size."""
    return f"{value / 1024**3:.1f} GiB"


def about_seconds(value: float) -> str:
    """The picker's "~N s": whole seconds (JavaScript's Math.round), at least 1."""
    return f"~{max(1, math.floor(value + 0.5))} s"


async def fleet_view(gateway: Gateway) -> dict[str, Any]:
    """GET /api/models/engines as the admin."""
    response = await gateway.as_admin("GET", "/api/models/engines")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def engine_state(gateway: Gateway, profile_id: str) -> str | None:
    """An engine's state as the fleet reports it (None: the fleet has never run it)."""
    engines = (await fleet_view(gateway))["engines"]
    return next((e["state"] for e in engines if e["profile_id"] == profile_id), None)


async def run_job(gateway: Gateway, profile_id: str, action: str) -> dict[str, Any]:
    """POST /api/models/{profile_id}/{action} and wait for its job to succeed."""
    started = await gateway.as_admin("POST", f"/api/models/{profile_id}/{action}")
    assert started.status_code == 202, started.text
    job_id = started.json()["job_id"]

    async def finished() -> dict[str, Any] | None:
        job = (await gateway.as_admin("GET", f"/api/models/jobs/{job_id}")).json()
        return None if job["status"] in ("pending", "running") else dict(job)

    job = dict(await eventually(finished, timeout_s=60, interval_s=0.2))
    assert job["status"] == "succeeded", job
    return job


async def assert_gpu_map(page: Page, fleet: dict[str, Any]) -> None:
    """Each GPU's bar and legend: every engine's share, what is not ours and what is free, in
    GiB as the API gives them."""
    rows = page.locator("#gpu-map figure")
    await expect(rows).to_have_count(len(fleet["gpus"]))
    for gpu in fleet["gpus"]:
        row = page.locator(f"#gpu-map figure[data-gpu='{gpu['index']}']")
        await expect(row.locator("figcaption")).to_have_text(
            f"GPU {gpu['index']} · {gpu['name']} · {gib(gpu['total_bytes'])}"
        )
        legend = row.locator("li")
        await expect(legend).to_have_count(len(gpu["engines"]) + 2)
        for share in gpu["engines"]:
            item = row.locator(f"li[data-profile='{share['profile_id']}']")
            await expect(item).to_have_attribute("data-state", share["state"])
            await expect(item).to_contain_text(gib(share["bytes"]))
        await expect(row.locator("li[data-segment=foreign]")).to_have_text(
            f"not ours {gib(gpu['not_ours_bytes'])}"
        )
        await expect(row.locator("li[data-segment=free]")).to_have_text(
            f"free {gib(gpu['free_bytes'])}"
        )
        # One drawn part per share that holds memory, over the bar's background.
        parts = [s["bytes"] for s in gpu["engines"]] + [gpu["not_ours_bytes"], gpu["free_bytes"]]
        drawn = sum(1 for size in parts if size > 0)
        await expect(row.locator("svg rect")).to_have_count(drawn + 1)


async def assert_buttons(row: Locator, enabled: set[str]) -> None:
    """Exactly the named actions of an engine's row are enabled."""
    for action in ("Load", "Unload", "Sleep", "Wake"):
        button = row.locator(f"button[data-action={action.lower()}]")
        await expect(button).to_have_text(action)
        if action in enabled:
            await expect(button).to_be_enabled()
        else:
            await expect(button).to_be_disabled()


async def test_console_shows_the_gpu_map_and_loads_sleeps_wakes_and_unloads_an_engine(
    fleet: Gateway, ui: UI
) -> None:
    page, _ = ui
    await sign_in(page, fleet, "/dashboard", "admin", fleet.admin_password)
    table = page.locator("#engine-table tbody")
    row_a = table.locator("tr[data-engine='gpu-a']")
    row_b = table.locator("tr[data-engine='gpu-b']")
    await expect(row_a).to_have_attribute("data-state", "ready")
    await expect(row_a.locator(".badge")).to_have_text(["default"])
    # gpu-b has never run: it is a row all the same, to be loaded from here.
    await expect(row_b).to_have_attribute("data-state", "idle")
    await expect(row_b.locator(".badge")).to_have_count(0)
    # A profile that can never run here is not a fleet row (the Models table says why).
    await expect(table.locator(f"tr[data-engine='{BIG_PROFILE}']")).to_have_count(0)
    await expect(page.locator("#fleet-summary")).to_contain_text("Default profile: gpu-a")

    view = await fleet_view(fleet)
    engine_a = next(e for e in view["engines"] if e["profile_id"] == "gpu-a")
    assert engine_a["gpu_ids"], engine_a  # placed as the GPU model it stands in for
    await expect(row_a.locator("td").nth(2)).to_have_text(", ".join(map(str, engine_a["gpu_ids"])))
    await expect(row_a.locator("td").nth(3)).to_contain_text(gib(engine_a["claim_bytes_per_gpu"]))
    await expect(row_a.locator("td").nth(4)).to_have_text(
        f"{engine_a['in_flight']} / {engine_a['queued']} / {engine_a['slots']}"
    )
    await assert_gpu_map(page, view)
    await assert_buttons(row_a, {"Unload", "Sleep"})
    await assert_buttons(row_b, {"Load"})
    assert await unnamed_controls(page) == []

    await page.get_by_role("button", name="Load gpu-b", exact=True).click()
    await expect(row_b).to_have_attribute("data-state", "ready", timeout=30_000)
    assert await engine_state(fleet, "gpu-b") == "ready"
    assert await engine_state(fleet, "gpu-a") == "ready"  # loaded beside it, not instead
    await expect(row_b.locator("td").nth(6)).to_contain_text(" s / ")
    await expect(page.locator("#gpu-map li[data-profile='gpu-b']")).to_have_attribute(
        "data-state", "ready"
    )
    await assert_gpu_map(page, await fleet_view(fleet))
    await assert_buttons(row_b, {"Unload", "Sleep"})
    await screenshot(page, "dashboard_fleet_two_engines")

    # Asleep: its residual stays on the map, and only Wake and Unload make sense.
    await page.get_by_role("button", name="Sleep gpu-b", exact=True).click()
    await expect(row_b).to_have_attribute("data-state", "asleep", timeout=30_000)
    assert await engine_state(fleet, "gpu-b") == "asleep"
    residual = page.locator("#gpu-map li[data-profile='gpu-b']")
    await expect(residual).to_have_attribute("data-state", "asleep")
    await expect(residual).to_contain_text("residual")
    await assert_buttons(row_b, {"Wake", "Unload"})
    await screenshot(page, "dashboard_fleet_one_asleep")
    await page.get_by_role("button", name="Wake gpu-b", exact=True).click()
    await expect(row_b).to_have_attribute("data-state", "ready", timeout=30_000)
    assert await engine_state(fleet, "gpu-b") == "ready"

    await page.get_by_role("button", name="Unload gpu-b", exact=True).click()
    await expect(row_b).to_have_attribute("data-state", "idle", timeout=30_000)
    assert await engine_state(fleet, "gpu-b") == "idle"
    await expect(page.locator("#gpu-map li[data-profile='gpu-b']")).to_have_count(0)
    await assert_buttons(row_b, {"Load"})
    await expect(row_a).to_have_attribute("data-state", "ready")
    await assert_gpu_map(page, await fleet_view(fleet))


async def test_console_shows_a_failed_load_with_why(gateway: Gateway, ui: UI) -> None:
    """A load that fails leaves the row failed with the engine's own reason, to load again; a
    profile without sleep mode is never offered a sleep."""
    page, _ = ui
    await sign_in(page, gateway, "/dashboard", "admin", gateway.admin_password)
    broken = page.locator("#engine-table tr[data-engine='sim-broken']")
    await expect(broken).to_have_attribute("data-state", "idle")
    await page.get_by_role("button", name="Load sim-broken", exact=True).click()
    await expect(broken).to_have_attribute("data-state", "failed", timeout=30_000)
    engine = next(
        e for e in (await fleet_view(gateway))["engines"] if e["profile_id"] == "sim-broken"
    )
    why = engine["error"] or engine["reason"]
    assert why, engine
    await expect(broken.locator("td").nth(1)).to_contain_text(why)
    await assert_buttons(broken, {"Load"})
    row_a = page.locator("#engine-table tr[data-engine='sim-a']")
    await expect(row_a).to_have_attribute("data-state", "ready")
    await assert_buttons(row_a, {"Unload"})


async def picker_option(page: Page, model: str) -> Locator:
    """The picker's option for a model."""
    return page.get_by_role("combobox", name="Model").locator(f"option[value='{model}']")


async def listed(gateway: Gateway) -> dict[str, dict[str, Any]]:
    """/v1/models as the user, by id."""
    response = await gateway.as_user("GET", "/v1/models")
    assert response.status_code == 200, response.text
    return {m["id"]: m for m in response.json()["data"]}


async def test_chat_picker_says_what_a_request_for_each_model_meets(
    fleet: Gateway, ui: UI, browser: Browser
) -> None:
    page, _ = ui
    models = await listed(fleet)
    assert BIG_PROFILE not in models  # it can never run here
    assert models["gpu-b"]["state"] == "not_loaded"
    assert models["gpu-b"]["load_s"] is None
    await sign_in(page, fleet, "/chat", fleet.user_name, fleet.user_password)
    picker = page.get_by_role("combobox", name="Model")
    await expect(picker).to_have_value("gpu-a")
    await expect(await picker_option(page, "gpu-a")).to_have_text("gpu-a — ready")
    await expect(await picker_option(page, "gpu-b")).to_have_text(
        "gpu-b — not loaded (loads on first use)"
    )
    await expect(await picker_option(page, BIG_PROFILE)).to_have_count(0)
    # Every listed model can be picked, loaded or not.
    await expect(picker.locator("option:disabled")).to_have_count(0)

    # Asleep, never woken yet: no figure for the wake.
    await run_job(fleet, "gpu-b", "load")
    await run_job(fleet, "gpu-b", "sleep")
    models = await listed(fleet)
    assert models["gpu-b"]["state"] == "sleeping", models["gpu-b"]
    assert models["gpu-b"]["wake_s"] is None
    await page.reload()
    await expect(await picker_option(page, "gpu-b")).to_have_text(
        "gpu-b — sleeping (wakes in a few seconds)"
    )
    # Woken once and asleep again: the last wake's time.
    await run_job(fleet, "gpu-b", "wake")
    await run_job(fleet, "gpu-b", "sleep")
    wake_s = (await listed(fleet))["gpu-b"]["wake_s"]
    assert isinstance(wake_s, float | int), wake_s
    await page.reload()
    await expect(await picker_option(page, "gpu-b")).to_have_text(
        f"gpu-b — sleeping (wakes in {about_seconds(wake_s)})"
    )
    await expect(await picker_option(page, "gpu-b")).to_have_attribute("data-state", "sleeping")
    # A normal user gets no button: a request wakes the model.
    await expect(page.locator("#switch-model")).to_be_hidden()
    await picker.select_option("gpu-b")
    await expect(page.locator("#switch-model")).to_be_hidden()

    # Unloaded after a cold load: the last load's time.
    await run_job(fleet, "gpu-b", "unload")
    load_s = (await listed(fleet))["gpu-b"]["load_s"]
    assert isinstance(load_s, float | int), load_s
    await page.reload()
    await expect(await picker_option(page, "gpu-b")).to_have_text(
        f"gpu-b — not loaded (loads in {about_seconds(load_s)})"
    )
    await screenshot(page, "chat_picker_fleet_states")

    # An admin wakes or loads the picked model from the chat, beside the others.
    context, admin, problems = await new_page(browser)
    try:
        await sign_in(admin, fleet, "/chat", "admin", fleet.admin_password)
        admin_picker = admin.get_by_role("combobox", name="Model")
        await admin_picker.select_option("gpu-b")
        await admin.get_by_role("button", name="Load model").click()
        await expect(admin.locator("#status-line")).to_have_text("gpu-b is ready.", timeout=30_000)
        await expect(await picker_option(admin, "gpu-b")).to_have_text("gpu-b — ready")
        await expect(await picker_option(admin, "gpu-a")).to_have_text("gpu-a — ready")
        await expect(admin.get_by_role("button", name="Load model")).to_be_hidden()
    finally:
        await context.close()
    assert not problems.errors
    assert await engine_state(fleet, "gpu-b") == "ready"
