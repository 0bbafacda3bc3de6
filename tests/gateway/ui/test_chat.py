"""The chat page in a real browser: sign in, streamed replies, history, stop, regenerate, and
untrusted text that must stay text."""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

from playwright.async_api import Browser, Dialog, Page, Route, expect

from tests.helpers.browser import (
    BIG_PROFILE,
    EXPECTED_CONSOLE,
    REPLY_WORDS,
    Gateway,
    PageProblems,
    new_page,
    screenshot,
    sign_in,
)

UI = tuple[Page, PageProblems]


async def sign_in_to_chat(page: Page, gateway: Gateway) -> None:
    """Sign in as alice and wait for the chat."""
    await sign_in(page, gateway, "/chat", gateway.user_name, gateway.user_password)
    await expect(page.get_by_role("textbox", name="Message")).to_be_visible()
    await expect(page.locator("#model-select")).to_have_value("sim-a")


async def only_conversation(gateway: Gateway) -> dict[str, Any]:
    """Alice's single conversation, with its messages, read through the API."""
    listed = (await gateway.as_user("GET", "/api/conversations")).json()["data"]
    assert len(listed) == 1, listed
    response = await gateway.as_user("GET", f"/api/conversations/{listed[0]['id']}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_sign_in_send_see_it_stream_and_find_it_after_a_reload(
    gateway: Gateway, ui: UI, browser: Browser
) -> None:
    page, _ = ui
    await sign_in_to_chat(page, gateway)
    prompt = page.get_by_role("textbox", name="Message")
    # Shift+Enter is a new line, Enter sends.
    await prompt.fill("Hello from the browser")
    await prompt.press("Shift+Enter")
    await prompt.press_sequentially("second line")
    await prompt.press("Enter")

    user = page.locator("article[data-role=user]")
    await expect(user).to_have_count(1)
    await expect(user.locator("br")).to_have_count(1)
    await expect(user).to_contain_text("Hello from the browser")
    reply = page.locator("article[data-role=assistant]")
    # The reply is seen while it streams: text grows with the cursor still there.
    await expect(reply).to_have_attribute("data-status", "streaming")
    content = reply.locator(".content")
    await expect(content).not_to_be_empty()
    seen = [len(await content.inner_text())]
    while await reply.get_attribute("data-status") == "streaming":
        seen.append(len(await content.inner_text()))
        await asyncio.sleep(0.1)
    assert len(set(seen)) >= 3, f"the reply did not arrive piece by piece: {seen}"
    await expect(reply).to_have_attribute("data-status", "complete")
    streamed = (await content.inner_text()).strip()
    assert len(streamed.split()) == REPLY_WORDS

    stored = await only_conversation(gateway)
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][0]["content"] == "Hello from the browser\nsecond line"
    assert stored["messages"][1]["content"] == streamed
    assert stored["messages"][1]["status"] == "complete"
    assert stored["messages"][1]["model"] == "sim-a"
    await expect(page.locator("#conversations li[data-id]")).to_have_count(1)

    # A reload keeps the session (sessionStorage) and reopens the conversation.
    await page.reload()
    await expect(page.locator("article[data-role=assistant] .content")).to_have_text(streamed)
    conversation = page.locator(f"#conversations li[data-id='{stored['id']}']")
    await expect(conversation).to_have_class("current")
    # The token is in no URL the page ever had.
    assert "eyJ" not in page.url

    # A new browser (nothing stored) signs in and finds it in the list.
    context, other, problems = await new_page(browser)
    try:
        await sign_in_to_chat(other, gateway)
        listed = other.locator("#conversations li[data-id] button.open")
        await expect(listed).to_have_count(1)
        await listed.click()
        await expect(other.locator("article[data-role=assistant] .content")).to_have_text(streamed)
        await screenshot(other, "chat_history_in_a_new_browser")
    finally:
        await context.close()
    assert not problems.errors


async def test_stop_mid_stream_keeps_the_partial_reply(gateway: Gateway, ui: UI) -> None:
    page, _ = ui
    await sign_in_to_chat(page, gateway)
    before = await gateway.simulator_stats()
    await page.get_by_role("textbox", name="Message").fill("Tell me a long story")
    await page.get_by_role("button", name="Send").click()
    reply = page.locator("article[data-role=assistant]")
    await expect(reply).to_have_attribute("data-status", "streaming")
    content = reply.locator(".content")
    # (wait_for_function with a string would need eval: the page's CSP refuses it.)
    await expect(content).to_have_text(re.compile(r"^\s*(\S+\s+){4,}\S"))
    stop = page.get_by_role("button", name="Stop")
    await stop.click()
    stopped_at = time.monotonic()
    await expect(reply).to_have_attribute("data-status", "incomplete")
    await expect(reply.locator(".badge")).to_have_text("incomplete")
    await expect(stop).to_be_hidden()
    await expect(page.get_by_role("button", name="Send")).to_be_visible()
    shown = (await content.inner_text()).strip()
    assert 5 <= len(shown.split()) < REPLY_WORDS

    # The gateway cancelled upstream and saved what had been produced, marked incomplete.
    for _ in range(100):
        stored = await only_conversation(gateway)
        last = stored["messages"][-1]
        if last["status"] != "streaming":
            break
        await asyncio.sleep(0.05)
    assert time.monotonic() - stopped_at < 5
    assert last["role"] == "assistant"
    assert last["status"] == "incomplete"
    assert last["content"].startswith(shown)
    assert len(last["content"].split()) < REPLY_WORDS
    # The engine itself saw its client go away (the gateway cancelled the upstream request, it
    # did not just stop forwarding): one more aborted request, none completed, none running.
    for _ in range(100):
        stats = await gateway.simulator_stats()
        if stats["aborted_total"] > before["aborted_total"] and not stats["running"]:
            break
        await asyncio.sleep(0.05)
    assert stats["aborted_total"] == before["aborted_total"] + 1, stats
    assert stats["completed_total"] == before["completed_total"], stats
    assert stats["running"] == 0, stats
    assert time.monotonic() - stopped_at < 10
    # Nothing more arrives after the stop.
    await asyncio.sleep(0.5)
    assert (await content.inner_text()).strip() == shown

    # The same conversation goes on: regenerate replaces the stopped reply with a whole one.
    await page.get_by_role("button", name="Regenerate").click()
    await expect(reply).to_have_count(1)
    await expect(reply).to_have_attribute("data-status", "complete", timeout=20_000)
    stored = await only_conversation(gateway)
    assert [m["role"] for m in stored["messages"]] == ["user", "assistant"]
    assert stored["messages"][1]["status"] == "complete"
    assert len(stored["messages"][1]["content"].split()) == REPLY_WORDS

    # Edit the last message: it is replaced and answered again.
    await page.get_by_role("button", name="Edit your last message").click()
    prompt = page.get_by_role("textbox", name="Message")
    await expect(prompt).to_have_value("Tell me a long story")
    await prompt.fill("A short story instead")
    await prompt.press("Enter")
    await expect(page.locator("article[data-role=user]")).to_have_text(
        re.compile("A short story instead")
    )
    await expect(reply).to_have_attribute("data-status", "complete", timeout=20_000)
    stored = await only_conversation(gateway)
    assert [(m["role"], m["status"]) for m in stored["messages"]] == [
        ("user", "complete"),
        ("assistant", "complete"),
    ]
    assert stored["messages"][0]["content"] == "A short story instead"


HOSTILE = (
    '<img src=x onerror="window.__pwned = 1">'
    "<script>window.__pwned = 2</script>"
    '<svg onload="window.__pwned = 3"></svg>'
)
HOSTILE_MARKDOWN = (
    "Here is **bold** and `code <b>not bold</b>`.\n\n"
    f"{HOSTILE}\n\n"
    "[a link](javascript:window.__pwned=4) and [a safe one](https://example.org/docs)\n\n"
    "![tracker](http://127.0.0.1:9/leak?secret=1)\n\n"
    "```html\n<script>window.__pwned = 5</script>\n```\n"
)


async def assert_nothing_ran(page: Page) -> None:
    """No hostile markup became elements, and none of its scripts ran."""
    assert await page.evaluate("window.__pwned") is None
    for selector in ("#messages img", "#messages script", "#messages svg", "#conversations img"):
        assert await page.locator(selector).count() == 0, selector
    assert await page.locator("a[href^='javascript']").count() == 0


async def test_model_output_and_titles_are_shown_as_text(gateway: Gateway, ui: UI) -> None:
    page, _ = ui
    # A stored conversation whose title and reply are hostile (imported as a user could).
    imported = await gateway.as_user(
        "POST",
        "/api/conversations/import",
        json={
            "version": 1,
            "conversation": {"title": f"Title {HOSTILE}"},
            "messages": [
                {"role": "user", "content": f"Echo this: {HOSTILE}"},
                {"role": "assistant", "content": HOSTILE_MARKDOWN, "model": "sim-a"},
            ],
        },
    )
    assert imported.status_code == 201, imported.text
    await sign_in_to_chat(page, gateway)
    title = page.locator("#conversations li[data-id] button.open")
    stored_title = imported.json()["title"]
    assert stored_title.startswith("Title <img src=x onerror=")
    await expect(title).to_have_text(stored_title)
    await title.click()
    reply = page.locator("article[data-role=assistant] .content")
    await expect(reply).to_contain_text('<img src=x onerror="window.__pwned = 1">')
    await expect(reply).to_contain_text("<script>window.__pwned = 2</script>")
    await expect(page.locator("article[data-role=user]")).to_contain_text(HOSTILE)
    # Markdown still works, without raw HTML: bold, code, a safe link, a code block.
    await expect(reply.locator("strong")).to_have_text("bold")
    await expect(reply.locator("p code")).to_have_text("code <b>not bold</b>")
    safe = reply.get_by_role("link", name="a safe one")
    await expect(safe).to_have_attribute("href", "https://example.org/docs")
    await expect(safe).to_have_attribute("rel", "noopener noreferrer nofollow")
    await expect(reply.get_by_text("[a link](javascript:window.__pwned=4)")).to_have_count(1)
    # An image becomes a link: nothing is fetched from the address in a reply.
    await expect(reply.get_by_role("link", name="image: tracker")).to_have_count(1)
    await expect(reply.locator(".code-block code")).to_have_text(
        "<script>window.__pwned = 5</script>"
    )
    await assert_nothing_ran(page)

    # The same through a streamed reply: the engine's events are data, never code (the
    # upstream of a peer project got its SSE executed in the browser: CVE-2025-64496).
    async def hostile_stream(route: Route) -> None:
        chunks = [HOSTILE_MARKDOWN[i : i + 7] for i in range(0, len(HOSTILE_MARKDOWN), 7)]
        events = [
            "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": chunk}}]})
            for chunk in chunks
        ]
        events.append('data: {"eval": "window.__pwned = 6", "choices": []}')
        events.append("data: [DONE]")
        await route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body="\n\n".join(events) + "\n\n",
        )

    await page.route("**/api/chat", hostile_stream)
    await page.get_by_role("button", name="New chat").click()
    await page.get_by_role("textbox", name="Message").fill("hi")
    await page.keyboard.press("Enter")
    streamed = page.locator("article[data-role=assistant] .content")
    await expect(streamed).to_contain_text("<script>window.__pwned = 2</script>")
    await expect(streamed.locator("strong")).to_have_text("bold")
    await assert_nothing_ran(page)


async def test_an_error_mid_stream_is_shown_in_place(gateway: Gateway, ui: UI) -> None:
    page, _ = ui

    async def failing_stream(route: Route) -> None:
        first = {"choices": [{"index": 0, "delta": {"content": "Partial answer"}}]}
        error = {"error": {"message": "The engine went away.", "type": "server_error"}}
        await route.fulfill(
            status=200,
            headers={"Content-Type": "text/event-stream"},
            body=f"data: {json.dumps(first)}\n\ndata: {json.dumps(error)}\n\ndata: [DONE]\n\n",
        )

    await sign_in_to_chat(page, gateway)
    await page.route("**/api/chat", failing_stream)
    await page.get_by_role("textbox", name="Message").fill("hi")
    await page.keyboard.press("Enter")
    reply = page.locator("article[data-role=assistant]")
    await expect(reply).to_have_attribute("data-status", "error")
    await expect(reply.locator(".content")).to_have_text("Partial answer")
    await expect(reply.get_by_role("alert")).to_have_text("The engine went away.")
    await page.unroute("**/api/chat")

    # A refused request (unknown model) is an error in place too, not a blank screen.
    await page.locator("#model-select").select_option("current")
    await page.route(
        "**/api/chat",
        lambda route: route.continue_(
            post_data=json.dumps({"model": "no-such-model", "message": "x"})
        ),
    )
    await page.get_by_role("textbox", name="Message").fill("again")
    await page.keyboard.press("Enter")
    await expect(reply.last).to_have_attribute("data-status", "error")
    await expect(reply.last.get_by_role("alert")).not_to_be_empty()


async def test_phone_width_fits_and_controls_have_names(gateway: Gateway, browser: Browser) -> None:
    context, page, problems = await new_page(browser, width=390, height=844)
    try:
        await sign_in(page, gateway, "/chat", gateway.user_name, gateway.user_password)
        await expect(page.get_by_role("textbox", name="Message")).to_be_visible()
        await page.get_by_role("textbox", name="Message").fill("A reply on a phone, please")
        await page.keyboard.press("Enter")
        reply = page.locator("article[data-role=assistant]")
        await expect(reply).to_have_attribute("data-status", "complete", timeout=20_000)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await screenshot(page, "chat_phone_width")
        # The conversation list is behind a button on a phone.
        toggle = page.get_by_role("button", name="Chats")
        await expect(page.locator("#conversations")).not_to_be_visible()
        await toggle.click()
        await expect(toggle).to_have_attribute("aria-expanded", "true")
        await expect(page.locator("#conversations li[data-id]")).to_have_count(1)
        assert await page.evaluate("document.documentElement.scrollWidth") <= 390
        await page.wait_for_timeout(300)  # the drawer's slide-in
        await screenshot(page, "chat_phone_width_conversations")
        assert await unnamed_controls(page) == []
    finally:
        await context.close()
    assert not problems.errors


UNNAMED_CONTROLS = """
() => [...document.querySelectorAll('button, input, select, textarea, a[href]')]
  .filter((el) => !(el.closest('[hidden]')))
  .filter((el) => {
    const named = (el.getAttribute('aria-label') || '').trim()
      || el.getAttribute('aria-labelledby')
      || (el.labels && el.labels.length)
      || (['BUTTON', 'A'].includes(el.tagName) && el.textContent.trim());
    return !named;
  })
  .map((el) => el.outerHTML.slice(0, 120))
"""


async def unnamed_controls(page: Page) -> list[str]:
    """Controls without an accessible name (label, aria-label or text)."""
    return list(await page.evaluate(UNNAMED_CONTROLS))


async def import_conversation(gateway: Gateway, title: str) -> str:
    """A stored conversation of alice's with one exchange; its id."""
    response = await gateway.as_user(
        "POST",
        "/api/conversations/import",
        json={
            "version": 1,
            "conversation": {"title": title},
            "messages": [
                {"role": "user", "content": f"About {title}"},
                {"role": "assistant", "content": f"Notes on **{title}**."},
            ],
        },
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


CODE = 'print("copied from a code block")'
REPLY_WITH_CODE = f"Run this:\n\n```python\n{CODE}\n```\n\nThen **check** the output."


async def clipboard(page: Page) -> str:
    """What the system clipboard holds, read through the page's clipboard API."""
    return str(await page.evaluate("navigator.clipboard.readText()"))


async def test_copy_buttons_put_the_reply_and_the_code_on_the_clipboard(
    gateway: Gateway, ui: UI
) -> None:
    page, _ = ui
    # The real clipboard, read back: 127.0.0.1 is a secure context, so the page takes the
    # navigator.clipboard path (not the execCommand fallback kept for plain-HTTP LAN hosts).
    await page.context.grant_permissions(
        ["clipboard-read", "clipboard-write"], origin=gateway.base_url
    )
    imported = await gateway.as_user(
        "POST",
        "/api/conversations/import",
        json={
            "version": 1,
            "conversation": {"title": "Copy me"},
            "messages": [
                {"role": "user", "content": "Show me some code"},
                {"role": "assistant", "content": REPLY_WITH_CODE, "model": "sim-a"},
            ],
        },
    )
    assert imported.status_code == 201, imported.text
    await sign_in_to_chat(page, gateway)
    await page.locator("#conversations li[data-id] button.open").click()
    reply = page.locator("article[data-role=assistant]")
    await expect(reply.locator(".code-block code")).to_have_text(CODE)
    assert await page.evaluate("window.isSecureContext") is True
    # Something else on the clipboard first: a stale value cannot pass for a copy.
    await page.evaluate("navigator.clipboard.writeText('not copied yet')")
    assert await clipboard(page) == "not copied yet"

    copy_code = reply.get_by_role("button", name="Copy code")
    await copy_code.click()
    await expect(copy_code).to_have_text("Copied")
    assert await clipboard(page) == CODE
    # The whole reply is copied as its Markdown source, not as the rendered text.
    copy_reply = reply.get_by_role("button", name="Copy reply")
    await copy_reply.click()
    await expect(copy_reply).to_have_text("Copied")
    assert await clipboard(page) == REPLY_WITH_CODE
    # The label comes back, ready for the next copy.
    await expect(copy_reply).to_have_text("Copy", timeout=5_000)


async def test_search_rename_and_delete_conversations(gateway: Gateway, ui: UI) -> None:
    page, _ = ui
    apples = await import_conversation(gateway, "Apples")
    pears = await import_conversation(gateway, "Pears")
    await sign_in_to_chat(page, gateway)
    items = page.locator("#conversations li[data-id]")
    await expect(items).to_have_count(2)
    # Newest first.
    await expect(items.first).to_have_attribute("data-id", pears)

    await page.get_by_role("searchbox", name="Search conversations").fill("app")
    await expect(items).to_have_count(1)
    await expect(items.first).to_have_attribute("data-id", apples)
    await page.get_by_role("searchbox", name="Search conversations").fill("")
    await expect(items).to_have_count(2)

    await page.get_by_role("button", name="Rename Apples").click()
    title = page.get_by_role("textbox", name="New title")
    await title.fill("Green apples")
    await title.press("Enter")
    await expect(page.locator(f"li[data-id='{apples}'] button.open")).to_have_text("Green apples")
    stored = (await gateway.as_user("GET", f"/api/conversations/{apples}")).json()
    assert stored["title"] == "Green apples"

    await page.locator(f"li[data-id='{pears}'] button.open").click()
    await expect(page.locator("article[data-role=assistant] strong")).to_have_text("Pears")
    page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
    await page.get_by_role("button", name="Delete Pears").click()
    await expect(items).to_have_count(1)
    # The open conversation was the deleted one: the page is a new chat again.
    await expect(page.locator("#messages .empty")).to_be_visible()
    gone = await gateway.as_user("GET", f"/api/conversations/{pears}")
    assert gone.status_code == 404


async def test_admin_loads_another_model_from_the_chat(
    gateway: Gateway, ui: UI, browser: Browser
) -> None:
    page, _ = ui
    await sign_in(page, gateway, "/chat", "admin", gateway.admin_password)
    picker = page.get_by_role("combobox", name="Model")
    await expect(picker).to_have_value("sim-a")
    # States are shown; a model that is not loaded can be loaded by an admin, beside the others.
    await expect(picker.locator("option[value=sim-b]")).to_have_text(
        "sim-b — not loaded (loads on first use)"
    )
    await picker.select_option("sim-b")
    await page.get_by_role("button", name="Load model").click()
    await expect(page.locator("#status-line")).to_have_text("sim-b is ready.", timeout=30_000)
    await expect(picker.locator("option[value=sim-b]")).to_have_text("sim-b — ready")
    await expect(picker.locator("option[value=sim-a]")).to_have_text("sim-a — ready")
    await expect(picker).to_have_value("sim-b")
    await page.get_by_role("textbox", name="Message").fill("Which model are you?")
    await page.keyboard.press("Enter")
    reply = page.locator("article[data-role=assistant]")
    await expect(reply).to_have_attribute("data-status", "complete")
    await expect(reply.locator(".meta")).to_contain_text("sim-b")

    # A normal user sees the states and may pick a model that is not loaded, but not load it:
    # without AUTO_SWITCH the request is refused, and the reply says so.
    context, other, problems = await new_page(browser)
    try:
        await sign_in(other, gateway, "/chat", gateway.user_name, gateway.user_password)
        user_picker = other.get_by_role("combobox", name="Model")
        unloaded = user_picker.locator("option[value=sim-broken]")
        await expect(unloaded).to_have_text("sim-broken — not loaded (loads on first use)")
        await expect(unloaded).to_be_enabled()
        await user_picker.select_option("sim-broken")
        await expect(user_picker).to_have_value("sim-broken")
        await expect(other.get_by_role("button", name="Load model")).to_be_hidden()
        await other.get_by_role("textbox", name="Message").fill("Hello?")
        await other.keyboard.press("Enter")
        refused = other.locator("article[data-role=assistant]")
        await expect(refused).to_have_attribute("data-status", "error")
        await expect(refused.get_by_role("alert")).to_contain_text("is not loaded")
    finally:
        await context.close()
    unexpected = [e for e in problems.errors if not EXPECTED_CONSOLE.search(e)]
    assert not unexpected, unexpected


HIGHLIGHTED_SOURCE = '# greet someone\ndef greet(name):\n    return "Hello, " + name * 2'
PLAIN_OUTPUT = "if this and that return 2 then done"
RAW_HTML = "<img src=x onerror=alert(1)> and <script>alert(2)</script>"
REPLY_WITH_HIGHLIGHTING = (
    f"Some code:\n\n```python\n{HIGHLIGHTED_SOURCE}\n```\n\n"
    f"Raw HTML outside a block: {RAW_HTML}\n\n"
    f"```html\n{RAW_HTML}\n```\n\n"
    f"```text\n{PLAIN_OUTPUT}\n```\n"
)


async def import_reply(gateway: Gateway, title: str, reply: str) -> None:
    """A stored conversation of alice's whose assistant reply is exactly `reply` (the
    simulator's own text is random, so a known reply comes in through the import API)."""
    imported = await gateway.as_user(
        "POST",
        "/api/conversations/import",
        json={
            "version": 1,
            "conversation": {"title": title},
            "messages": [
                {"role": "user", "content": "Show me"},
                {"role": "assistant", "content": reply, "model": "sim-a"},
            ],
        },
    )
    assert imported.status_code == 201, imported.text


async def test_code_blocks_are_highlighted_and_raw_html_stays_text(
    gateway: Gateway, ui: UI
) -> None:
    page, _ = ui
    dialogs: list[str] = []

    async def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        await dialog.dismiss()

    # An alert() that ran would open a dialog: none may, whatever the CSP would also block.
    page.on("dialog", on_dialog)
    await import_reply(gateway, "Highlighting", REPLY_WITH_HIGHLIGHTING)
    await sign_in_to_chat(page, gateway)
    await page.locator("#conversations li[data-id] button.open").click()
    reply = page.locator("article[data-role=assistant] .content")
    python = reply.locator(".code-block code.language-python")
    # The code text is intact, and it is split into highlighted tokens, not left as one string.
    await expect(python).to_have_text(HIGHLIGHTED_SOURCE)
    await expect(python.locator("span.tok-comment")).to_have_text(["# greet someone"])
    await expect(python.locator("span.tok-keyword")).to_have_text(["def", "return"])
    await expect(python.locator("span.tok-string")).to_have_text(['"Hello, "'])
    await expect(python.locator("span.tok-number")).to_have_text(["2"])
    await expect(reply.locator(".code-block .code-lang").first).to_have_text("python")
    # The classes are styled: a keyword is drawn unlike plain code.
    keyword_color = await python.locator("span.tok-keyword").first.evaluate(
        "el => getComputedStyle(el).color"
    )
    assert keyword_color != await python.evaluate("el => getComputedStyle(el).color")

    # Raw HTML, in a paragraph and in a code block, is text: no element, no handler, no dialog.
    await expect(reply.locator("p").filter(has_text="Raw HTML")).to_contain_text(RAW_HTML)
    html = reply.locator(".code-block code.language-html")
    await expect(html).to_have_text(RAW_HTML)
    # Programming keywords mean nothing in markup ("and" here), nor anything in plain output.
    await expect(html.locator("span.tok-keyword")).to_have_count(0)
    plain = reply.locator(".code-block code.language-text")
    await expect(plain).to_have_text(PLAIN_OUTPUT)
    await expect(plain.locator("span")).to_have_count(0)
    for selector in ("img", "script", "[onerror]"):
        assert await page.locator(f"#messages {selector}").count() == 0, selector
    await page.wait_for_timeout(300)  # an onerror would fire as soon as the image failed
    assert dialogs == []


async def test_picker_leaves_out_a_model_that_cannot_run_here(
    gateway: Gateway, ui: UI, browser: Browser
) -> None:
    page, _ = ui
    listed = (await gateway.as_user("GET", "/v1/models")).json()["data"]
    assert BIG_PROFILE not in {m["id"] for m in listed}
    assert {m["id"]: m["state"] for m in listed}["sim-b"] == "not_loaded"
    # Neither an admin nor a normal user is offered it; the others are shown with their states.
    await sign_in(page, gateway, "/chat", "admin", gateway.admin_password)
    context, other, problems = await new_page(browser)
    try:
        await sign_in_to_chat(other, gateway)
        for who in (page, other):
            picker = who.get_by_role("combobox", name="Model")
            await expect(picker).to_have_value("sim-a")
            await expect(picker.locator(f"option[value='{BIG_PROFILE}']")).to_have_count(0)
            await expect(picker.locator("option[value=sim-a]")).to_have_text("sim-a — ready")
            await expect(picker.locator("option[value=sim-b]")).to_have_text(
                "sim-b — not loaded (loads on first use)"
            )
        await screenshot(other, "chat_picker_as_a_user")
    finally:
        await context.close()
    assert not problems.errors
    # The server refuses it too, whatever a page sends.
    switch = await gateway.as_admin("POST", "/api/models/switch", json={"profile_id": BIG_PROFILE})
    assert switch.status_code == 409, switch.text
    assert switch.json()["error"]["code"] == "profile_does_not_fit"


WIDE_REPLY = (
    "A long unbroken word: " + "x" * 300 + "\n\n"
    "```text\n" + "wide code line " * 40 + "\n```\n\n"
    "| a | b | c | d | e | f |\n|---|---|---|---|---|---|\n"
    + "| "
    + " | ".join(["a-rather-long-cell-value"] * 6)
    + " |\n\n"
    "https://example.org/" + "very-long-path-" * 20 + "\n"
)


async def assert_fits_the_phone(page: Page) -> None:
    """No sideways scroll, and the message box and the send button on screen."""
    widths = await page.evaluate(
        "[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]"
    )
    assert widths[0] <= widths[2], widths
    assert widths[1] <= widths[2], widths
    for control in (
        page.get_by_role("textbox", name="Message"),
        page.get_by_role("button", name="Send"),
    ):
        await expect(control).to_be_visible()
        await expect(control).to_be_in_viewport(ratio=1)


async def test_phone_width_has_no_sideways_scroll_and_keeps_send_in_view(
    gateway: Gateway, browser: Browser
) -> None:
    context, page, problems = await new_page(browser, width=390, height=844)
    try:
        # A reply full of things that push a page sideways: a long word, a wide code block,
        # a wide table and a long link. They must scroll inside their own boxes (or wrap).
        await import_reply(gateway, "Wide things", WIDE_REPLY)
        await sign_in(page, gateway, "/chat", gateway.user_name, gateway.user_password)
        await expect(page.get_by_role("textbox", name="Message")).to_be_visible()
        await assert_fits_the_phone(page)
        await page.get_by_role("button", name="Chats").click()
        await page.locator("#conversations li[data-id] button.open").click()
        reply = page.locator("article[data-role=assistant] .content")
        await expect(reply.locator(".code-block")).to_have_count(1)
        await expect(reply.locator("table")).to_have_count(1)
        await assert_fits_the_phone(page)
        await screenshot(page, "chat_phone_width_wide_reply")
        # A long message typed in the box does not widen the page either.
        await page.get_by_role("textbox", name="Message").fill("y" * 500)
        await assert_fits_the_phone(page)
    finally:
        await context.close()
    assert not problems.errors
