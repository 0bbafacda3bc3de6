"""Seed 000's request tester (/test) in a real browser: a request to any route of the gateway,
its raw status, headers and body shown as text; a path that would leave the gateway is refused
before anything is sent."""

from __future__ import annotations

import json

from playwright.async_api import Page, expect

from tests.helpers.browser import Gateway, PageProblems, sign_in

UI = tuple[Page, PageProblems]


async def _send(page: Page, method: str, path: str, body: str | None = None) -> None:
    await page.get_by_label("Method").select_option(method)
    await page.get_by_label("Path").fill(path)
    if body is not None:
        await page.get_by_label("Body (JSON; sent only for POST, PUT and PATCH)").fill(body)
    await page.get_by_role("button", name="Send").click()


async def test_a_request_and_its_raw_response(gateway: Gateway, ui: UI) -> None:
    page, _ = ui
    await page.goto(gateway.url("/test"))
    # Without credentials: the gateway's own 401, shown as it came.
    await _send(page, "GET", "/v1/models")
    await expect(page.locator("#response-status")).to_contain_text("401")
    await expect(page.locator("#response-headers")).to_contain_text("www-authenticate: Bearer")
    await expect(page.locator("#response-body")).to_contain_text('"code": "missing_credentials"')

    # With the user's token typed in: a chat completion, its headers and JSON body.
    await page.get_by_label("Authorization").fill(gateway.user_token)
    body = {"model": "current", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    await _send(page, "POST", "/v1/chat/completions", json.dumps(body))
    await expect(page.locator("#response-status")).to_contain_text("200")
    await expect(page.locator("#response-headers")).to_contain_text(
        "content-type: application/json"
    )
    shown = await page.locator("#response-body").inner_text()
    assert json.loads(shown)["object"] == "chat.completion"

    # A stream is shown as the engine's events.
    await _send(page, "POST", "/v1/chat/completions", json.dumps({**body, "stream": True}))
    await expect(page.locator("#response-body")).to_contain_text("data: [DONE]")
    await expect(page.locator("#response-headers")).to_contain_text("text/event-stream")


async def test_paths_off_the_gateway_are_never_sent(gateway: Gateway, ui: UI) -> None:
    page, _ = ui
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url))
    await page.goto(gateway.url("/test"))
    await page.get_by_label("Authorization").fill(gateway.user_token)
    before = len(sent)
    for path in ("https://evil.example/steal", "//evil.example/steal", "/\\evil.example", "v1/x"):
        await _send(page, "GET", path)
        await expect(page.locator("#request-error")).to_contain_text("Only paths of this gateway")
    assert sent[before:] == []


async def test_the_signed_in_session_is_used_when_no_token_is_typed(
    gateway: Gateway, ui: UI
) -> None:
    page, _ = ui
    # Signed in on the chat in this tab: the tester sends that session's token.
    await sign_in(page, gateway, "/chat", gateway.user_name, gateway.user_password)
    await expect(page.get_by_role("textbox", name="Message")).to_be_visible()
    await page.goto(gateway.url("/test"))
    await _send(page, "GET", "/api/auth/me")
    await expect(page.locator("#response-status")).to_contain_text("200")
    await expect(page.locator("#response-body")).to_contain_text(f'"{gateway.user_name}"')
