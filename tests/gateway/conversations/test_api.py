"""/api/conversations on real Postgres: ownership, pagination, search, export and import."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.helpers.chat import chat, messages
from tests.helpers.proxy import sim_profile
from tests.helpers.quota import (
    ADMIN_PASSWORD,
    bearer,
    create_user,
    error_code,
    login,
    quota_gateway,
    quota_settings,
)

pytestmark = pytest.mark.postgres

PROFILES = {"sim-a": sim_profile("sim-a", "--response-tokens", "4")}


async def _create(http: httpx.AsyncClient, token: str, title: str) -> dict[str, Any]:
    reply = await http.post("/api/conversations", json={"title": title}, headers=bearer(token))
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


async def _all_pages(
    http: httpx.AsyncClient, token: str, limit: int, between_pages: Any = None
) -> list[str]:
    titles: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        page = (await http.get("/api/conversations", params=params, headers=bearer(token))).json()
        titles += [c["title"] for c in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return titles
        if between_pages is not None:
            await between_pages()


async def test_crud_pagination_and_search(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        for i in range(7):
            await _create(http, token, f"Topic {i} {'rust' if i % 3 == 0 else 'python'}")

        titles = await _all_pages(http, token, limit=3)
        assert titles == [
            f"Topic {i} {'rust' if i % 3 == 0 else 'python'}" for i in range(6, -1, -1)
        ]

        # Conversations made while paging appear on no later page and nothing repeats.
        made: list[int] = []

        async def insert() -> None:
            made.append(len(made))
            await _create(http, token, f"Inserted {len(made)}")

        stable = await _all_pages(http, token, limit=2, between_pages=insert)
        assert stable == titles
        assert made

        found = await http.get("/api/conversations", params={"q": "RUST"}, headers=bearer(token))
        assert [c["title"] for c in found.json()["data"]] == [
            "Topic 6 rust",
            "Topic 3 rust",
            "Topic 0 rust",
        ]
        wildcard = await http.get("/api/conversations", params={"q": "%"}, headers=bearer(token))
        assert wildcard.json()["data"] == []  # LIKE wildcards are matched literally

        target = (await http.get("/api/conversations", headers=bearer(token))).json()["data"][0]
        renamed = await http.patch(
            f"/api/conversations/{target['id']}",
            json={"title": "  Renamed\n title ", "archived": True},
            headers=bearer(token),
        )
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["title"] == "Renamed title"
        assert renamed.json()["archived"] is True
        active = (await http.get("/api/conversations", headers=bearer(token))).json()["data"]
        assert target["id"] not in [c["id"] for c in active]
        archived = await http.get(
            "/api/conversations", params={"archived": "true"}, headers=bearer(token)
        )
        assert [c["id"] for c in archived.json()["data"]] == [target["id"]]

        gone = await http.delete(f"/api/conversations/{target['id']}", headers=bearer(token))
        assert gone.status_code == 204
        again = await http.get(f"/api/conversations/{target['id']}", headers=bearer(token))
        assert again.status_code == 404

        # A cursor is a position in the clear (the document states its shape): any of that
        # shape is answered with the page after it, another shape is a 400.
        listed = (await http.get("/api/conversations", headers=bearer(token))).json()["data"]
        before_all = await http.get(
            "/api/conversations",
            params={"cursor": "9" * 17 + "." + "f" * 32},
            headers=bearer(token),
        )
        assert before_all.status_code == 200, before_all.text
        assert before_all.json()["data"] == listed
        after_all = await http.get(
            "/api/conversations", params={"cursor": "0." + "0" * 32}, headers=bearer(token)
        )
        assert after_all.status_code == 200, after_all.text
        assert after_all.json() == {"data": [], "next_cursor": None}
        for params, param in (
            ({"cursor": "not-a-cursor"}, "cursor"),
            ({"cursor": "1." + "F" * 32}, "cursor"),
            ({"limit": 0}, "limit"),
            ({"limit": 1000}, "limit"),
        ):
            bad = await http.get("/api/conversations", params=params, headers=bearer(token))
            assert bad.status_code == 400, bad.text
            assert bad.json()["error"]["param"] == param
        bad_body = await http.post(
            "/api/conversations", json={"title": "x", "user_id": "someone"}, headers=bearer(token)
        )
        assert bad_body.status_code == 400
        # Ids are UUIDs in the path: anything else names no conversation.
        bad_id = await http.get("/api/conversations/not-a-uuid", headers=bearer(token))
        assert bad_id.status_code == 404
        assert bad_id.json()["error"]["code"] == "not_found"
        # ... and /import is never read as an id.
        wrong_method = await http.patch("/api/conversations/import", headers=bearer(token))
        assert wrong_method.status_code == 405
        assert wrong_method.headers["allow"] == "POST"
        not_bool = await http.post("/api/conversations", json={"title": "t"}, headers=bearer(token))
        assert not_bool.status_code == 201, not_bool.text
        archived = await http.patch(
            f"/api/conversations/{not_bool.json()['id']}",
            json={"archived": 1},
            headers=bearer(token),
        )
        assert archived.status_code == 400
        assert archived.json()["error"]["param"] == "archived"


async def test_another_users_conversation_is_not_found(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        await create_user(http, "bob")
        alice, bob = await login(http, "alice"), await login(http, "bob")
        sent = await chat(http, alice, message="alice's secret plan")
        conversation_id = sent.headers["X-Conversation-Id"]

        for method, path, body in (
            ("GET", f"/api/conversations/{conversation_id}", None),
            ("PATCH", f"/api/conversations/{conversation_id}", {"title": "mine now"}),
            ("DELETE", f"/api/conversations/{conversation_id}", None),
            ("GET", f"/api/conversations/{conversation_id}/export", None),
        ):
            reply = await http.request(method, path, json=body, headers=bearer(bob))
            assert reply.status_code == 404, (method, path, reply.text)
            assert error_code(reply) == "conversation_not_found"
            assert "secret" not in reply.text
        stolen = await chat(http, bob, conversation_id=conversation_id, message="hi")
        assert stolen.status_code == 404
        listed = (await http.get("/api/conversations", headers=bearer(bob))).json()
        assert listed["data"] == []
        # Nothing changed for alice.
        assert len(await messages(http, alice, conversation_id)) == 2

        # An admin reads others' conversations only when the setting allows it.
        admin = await login(http, "admin", ADMIN_PASSWORD)
        closed = await http.get(f"/api/conversations/{conversation_id}", headers=bearer(admin))
        assert closed.status_code == 404


async def test_admin_may_read_for_support_when_allowed(pg_url: str) -> None:
    settings = quota_settings(pg_url, profiles=PROFILES, ADMIN_CAN_READ_CONVERSATIONS=True)
    async with quota_gateway(settings) as gw:
        http = gw.http
        await create_user(http, "alice")
        alice = await login(http, "alice")
        sent = await chat(http, alice, message="help me")
        conversation_id = sent.headers["X-Conversation-Id"]
        admin = await login(http, "admin", ADMIN_PASSWORD)
        read = await http.get(f"/api/conversations/{conversation_id}", headers=bearer(admin))
        assert read.status_code == 200
        assert read.json()["messages"][0]["content"] == "help me"
        # Read only: no changes, no chatting in someone else's conversation.
        changed = await http.patch(
            f"/api/conversations/{conversation_id}", json={"title": "x"}, headers=bearer(admin)
        )
        assert changed.status_code == 404
        posted = await chat(http, admin, conversation_id=conversation_id, message="hi")
        assert posted.status_code == 404


async def test_messages_are_paginated_in_order(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        first = await chat(http, token, message="m0")
        conversation_id = first.headers["X-Conversation-Id"]
        for i in range(1, 4):
            await chat(http, token, conversation_id=conversation_id, message=f"m{i}")
        seen: list[int] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 3}
            if cursor:
                params["cursor"] = cursor
            page = (
                await http.get(
                    f"/api/conversations/{conversation_id}", params=params, headers=bearer(token)
                )
            ).json()
            seen += [m["seq"] for m in page["messages"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == list(range(8))
        # The cursor is the seq of the last message seen: any seq is a position.
        for cursor, seqs in (("5", [6, 7]), ("99", [])):
            page = await http.get(
                f"/api/conversations/{conversation_id}",
                params={"cursor": cursor},
                headers=bearer(token),
            )
            assert page.status_code == 200, page.text
            assert [m["seq"] for m in page.json()["messages"]] == seqs
        for cursor in ("-1", "1.5", "W1s1XQ"):
            bad = await http.get(
                f"/api/conversations/{conversation_id}",
                params={"cursor": cursor},
                headers=bearer(token),
            )
            assert bad.status_code == 400, bad.text
            assert bad.json()["error"]["param"] == "cursor"


async def test_export_json_and_markdown_and_import_round_trip(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        await create_user(http, "bob")
        token = await login(http, "alice")
        first = await chat(
            http,
            token,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "# Not a heading\n```code```"},
            ],
        )
        conversation_id = first.headers["X-Conversation-Id"]
        await chat(http, token, conversation_id=conversation_id, message="second ünïcödé 질문")

        exported = await http.get(
            f"/api/conversations/{conversation_id}/export", headers=bearer(token)
        )
        assert exported.status_code == 200
        assert exported.headers["content-disposition"].startswith("attachment;")
        document = exported.json()
        assert document["version"] == 1
        assert [m["role"] for m in document["messages"]] == [
            "system",
            "user",
            "assistant",
            "user",
            "assistant",
        ]

        markdown = await http.get(
            f"/api/conversations/{conversation_id}/export",
            params={"format": "markdown"},
            headers=bearer(token),
        )
        assert markdown.headers["content-type"].startswith("text/markdown")
        text = markdown.text
        # The title is the first user message's (whitespace collapsed), never the system prompt.
        assert document["conversation"]["title"] == "# Not a heading ```code```"
        assert text.startswith("# # Not a heading ```code```\n")
        assert "## User" in text
        assert "second ünïcödé 질문" in text
        assert document["messages"][2]["content"] in text

        # Bob imports alice's export as his own: same messages, a new id, his alone.
        bob = await login(http, "bob")
        imported = await http.post("/api/conversations/import", json=document, headers=bearer(bob))
        assert imported.status_code == 201, imported.text
        new_id = imported.json()["id"]
        assert new_id != conversation_id
        again = (await http.get(f"/api/conversations/{new_id}/export", headers=bearer(bob))).json()

        def essence(doc: dict[str, Any]) -> list[tuple[Any, ...]]:
            return [
                (m["role"], m["content"], m["model"], m["status"], m["completion_tokens"])
                for m in doc["messages"]
            ]

        assert essence(again) == essence(document)
        assert again["conversation"]["title"] == document["conversation"]["title"]

        bad = await http.post(
            "/api/conversations/import",
            json={"version": 1, "conversation": {}, "messages": [{"role": "tool", "content": ""}]},
            headers=bearer(bob),
        )
        assert bad.status_code == 400
        assert "messages" in (bad.json()["error"]["param"] or "")


async def test_nul_characters_are_refused_naming_the_field(pg_url: str) -> None:
    # Postgres text cannot hold U+0000: a 400 naming the field, not a 503 "database down".
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        kept = await _create(http, token, "Plain title")

        def document(title: str, content: str) -> dict[str, Any]:
            return {
                "version": 1,
                "conversation": {"title": title},
                "messages": [{"role": "user", "content": content}],
            }

        requests: list[tuple[str, str, dict[str, Any], str]] = [
            ("POST", "/api/conversations", {"title": "a\u0000b"}, "title"),
            ("PATCH", f"/api/conversations/{kept['id']}", {"title": "a\u0000b"}, "title"),
            ("POST", "/api/conversations/import", document("t", "a\u0000b"),
             "messages.0.content"),
            ("POST", "/api/conversations/import", document("a\u0000b", "hi"),
             "conversation.title"),
        ]  # fmt: skip
        for method, path, body, param in requests:
            reply = await http.request(method, path, json=body, headers=bearer(token))
            assert reply.status_code == 400, (method, path, reply.text)
            assert reply.json()["error"]["param"] == param, (method, path, reply.text)
        search = await http.get(
            "/api/conversations", params={"q": "a\u0000"}, headers=bearer(token)
        )
        assert search.status_code == 400, search.text
        assert search.json()["error"]["param"] == "q"

        listed = (await http.get("/api/conversations", headers=bearer(token))).json()["data"]
        assert [(c["id"], c["title"]) for c in listed] == [(kept["id"], "Plain title")]


async def test_database_down_is_a_503_before_any_engine_call(
    pg_url: str, postgres_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.keys.service import KEY_CACHE
    from tests.helpers.quota import create_key

    # An API key is checked from the key cache without the database (a JWT's user is loaded
    # from it on every request): with the key cached, the 503 is /api/chat's own, never the
    # auth_unavailable of an expired cache entry. A long TTL and a fresh lookup just before the
    # database stops keep the entry for the whole test.
    monkeypatch.setattr(KEY_CACHE, "ttl_s", 300.0)
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        key = (await create_key(http, "alice"))["key"]
        warm = await chat(http, key, message="warm the key cache")
        assert warm.status_code == 200
        engine_calls = (await gw.sim_stats())["requests_total"]
        KEY_CACHE.clear()
        listed = await http.get("/api/conversations", headers=bearer(key))
        assert listed.status_code == 200
        assert len(KEY_CACHE) == 1
        await asyncio.to_thread(postgres_server.pause)
        try:
            for stream in (True, False):
                down = await chat(http, key, message="is anyone there?", stream=stream)
                assert down.status_code == 503, down.text
                assert error_code(down) == "database_unavailable"
                assert down.headers["X-Error-Source"] == "gateway"
                assert int(down.headers["Retry-After"]) > 0
            # An idempotent request cannot even look up its key: the same 503.
            keyed = await chat(
                http, key, message="is anyone there?", headers={"Idempotency-Key": "down-1"}
            )
            assert keyed.status_code == 503, keyed.text
            assert error_code(keyed) == "database_unavailable"
            listed = await http.get("/api/conversations", headers=bearer(key))
            assert listed.status_code == 503
            assert error_code(listed) == "database_unavailable"
            # The engine saw nothing of the failed requests.
            assert (await gw.sim_stats())["requests_total"] == engine_calls
        finally:
            await asyncio.to_thread(postgres_server.resume)
        assert (await gw.sim_stats())["requests_total"] == engine_calls
        # Nothing half-saved: the failed request left no conversation, and nothing committed
        # before the crash was lost (the warm-up's conversation is still there).
        listed = await http.get("/api/conversations", headers=bearer(key))
        assert listed.status_code == 200
        ids = [c["id"] for c in listed.json()["data"]]
        assert "is anyone there?" not in [c["title"] for c in listed.json()["data"]]
        assert ids == [warm.headers["X-Conversation-Id"]]
