"""The field policy (gateway/fields.py) on every route, through a real gateway and a simulator
engine: refused fields never reach the engine, data fields arrive as sent, and only an admin
widens what a key or a tier may send."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.fields import (
    ENGINE_CONTROL_FIELDS,
    REFUSED_NAME_PATTERN,
    REQUEST_FIELD_REF,
    ROUTING_FIELDS,
)
from gateway.migrate import upgrade
from tests.helpers.proxy import HELLO, Gateway, gateway
from tests.helpers.quota import ADMIN, bearer, create_key, create_user, login, quota_settings

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
API_CHAT = "/api/chat"
BODIES: dict[str, dict[str, Any]] = {
    CHAT: {"model": "sim-a", "messages": HELLO, "max_tokens": 2},
    COMPLETIONS: {"model": "sim-a", "prompt": "hello", "max_tokens": 2},
    EMBEDDINGS: {"model": "sim-a", "input": "hello"},
    API_CHAT: {"model": "sim-a", "message": "hello", "max_tokens": 2},
}
ROUTES = list(BODIES)


def spellings(name: str) -> list[str]:
    """The field as sent, and as upper case, camelCase and kebab-case."""
    words = name.split("_")
    return [
        name,
        name.upper(),
        words[0] + "".join(word.title() for word in words[1:]),
        "-".join(words),
    ]


@dataclass
class Callers:
    """The served gateway and the credentials of the tests' callers."""

    gw: Gateway
    alice_token: str  # a standard user's login
    alice_key: str  # her key with no grants
    alice_key_id: str
    granted_key: str  # her key an admin allowed `chat_template`
    granted_key_id: str
    premium_key: str  # a premium key: ALLOWED_FIELDS_PREMIUM allows `vllm_xargs`
    standard_key: str


@pytest.fixture(scope="module")
async def callers() -> AsyncIterator[Callers]:
    url = f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp(prefix='vcg-fields-')) / 'gw.db'}"
    await asyncio.to_thread(upgrade, url)
    settings = quota_settings(url, ALLOWED_FIELDS_PREMIUM="vllm_xargs")
    async with gateway(settings) as gw:
        http = gw.http
        await create_user(http, "alice", tier="standard")
        token = await login(http, "alice")
        plain = await create_key(http, "alice")
        granted = await create_key(http, "alice", allowed_fields=["chat_template"])
        assert granted["allowed_fields"] == ["chat_template"]
        assert plain["allowed_fields"] == []
        premium = await create_key(http, "svc-premium", tier="premium")
        standard = await create_key(http, "svc-standard", tier="standard")
        yield Callers(
            gw=gw,
            alice_token=token,
            alice_key=plain["key"],
            alice_key_id=plain["id"],
            granted_key=granted["key"],
            granted_key_id=granted["id"],
            premium_key=premium["key"],
            standard_key=standard["key"],
        )


async def _engine_requests(gw: Gateway) -> list[dict[str, Any]]:
    url = await gw.wait_ready()
    reply = await gw.http.get(f"{url}/simulator/requests", headers=gw.engine_headers())
    assert reply.status_code == 200, reply.text
    return list(reply.json()["data"])


async def _conversations(callers: Callers) -> int:
    reply = await callers.gw.http.get("/api/conversations", headers=bearer(callers.alice_token))
    assert reply.status_code == 200, reply.text
    return len(reply.json()["data"])


async def _send(callers: Callers, route: str, key: str, **fields: Any) -> Any:
    return await callers.gw.http.post(
        route, json={**BODIES[route], **fields}, headers=bearer(key), timeout=60
    )


@pytest.mark.parametrize("route", ROUTES)
async def test_every_refused_field_and_spelling_is_a_400_naming_it(
    callers: Callers, route: str
) -> None:
    gw = callers.gw
    engine_before = (await gw.sim_stats())["requests_total"]
    conversations_before = await _conversations(callers)
    wrong: list[tuple[str, int, Any]] = []
    names = sorted(ROUTING_FIELDS | set(ENGINE_CONTROL_FIELDS))
    for name in names:
        for spelled in spellings(name):
            reply = await _send(callers, route, callers.alice_key, **{spelled: "x"})
            error = reply.json().get("error") or {}
            if (
                reply.status_code != 400
                or error.get("code") != "forbidden_field"
                or error.get("param") != spelled
                or reply.headers.get("x-error-source") != "gateway"
            ):
                wrong.append((spelled, reply.status_code, error))
            elif name in ENGINE_CONTROL_FIELDS and "allowed_fields" not in error["message"]:
                wrong.append((spelled, reply.status_code, "no word on how to allow it"))
    assert wrong == []
    # Nothing reached the engine, and /api/chat saved nothing.
    assert (await gw.sim_stats())["requests_total"] == engine_before
    assert await _conversations(callers) == conversations_before


@pytest.mark.parametrize("route", ROUTES)
async def test_template_inside_chat_template_kwargs_is_refused(
    callers: Callers, route: str
) -> None:
    reply = await _send(
        callers, route, callers.alice_key, chat_template_kwargs={"chat_template": "{{ 7*7 }}"}
    )
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "chat_template_kwargs.chat_template"


DATA: dict[str, dict[str, Any]] = {
    CHAT: {
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "chat_template_kwargs": {"enable_thinking": False},
        "response_format": {"type": "json_object"},
        "guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}},
        "guided_choice": ["yes", "no"],
        "guided_regex": "[a-z]+",
        "guided_grammar": 'root ::= "a"',
        "structured_outputs": {"choice": ["x", "y"]},
        "reasoning_effort": "low",
        "some_future_openai_field": {"plain": [1, "data"]},
    },
    COMPLETIONS: {
        "top_k": 3,
        "min_p": 0.05,
        "repetition_penalty": 1.2,
        "structured_outputs": {"regex": "[0-9]+"},
        "guided_regex": "[0-9]+",
        "some_future_openai_field": True,
    },
    EMBEDDINGS: {"truncate_prompt_tokens": 8, "use_activation": True, "normalize": True},
    API_CHAT: {
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "chat_template_kwargs": {"enable_thinking": True},
        "response_format": {"type": "json_object"},
        "structured_outputs": {"choice": ["x", "y"]},
        "guided_json": {"type": "object"},
        "some_future_openai_field": "plain",
    },
}


@pytest.mark.parametrize("route", ROUTES)
async def test_data_fields_reach_the_engine_as_sent(callers: Callers, route: str) -> None:
    for key in (callers.alice_key, callers.alice_token):
        reply = await _send(callers, route, key, **DATA[route])
        assert reply.status_code == 200, reply.text
        received = (await _engine_requests(callers.gw))[-1]
        for name, value in DATA[route].items():
            assert received.get(name) == value, (route, name, received)


async def test_api_chat_refuses_fields_that_would_change_its_stored_reply(
    callers: Callers,
) -> None:
    before = await _conversations(callers)
    for name, value in (("n", 2), ("echo", True), ("stream_options", {"include_usage": True})):
        reply = await _send(callers, API_CHAT, callers.alice_token, **{name: value})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == name
        assert "/v1/chat/completions" in reply.json()["error"]["message"]
    huge = await _send(callers, API_CHAT, callers.alice_token, top_k=2**70)
    assert huge.status_code == 400, huge.text
    assert huge.json()["error"]["param"] == "top_k"
    assert await _conversations(callers) == before


@pytest.mark.parametrize("route", ROUTES)
async def test_a_field_an_admin_allowed_passes_for_that_key_only(
    callers: Callers, route: str
) -> None:
    template = "{% for m in messages %}{{ m.content }}{% endfor %}"
    for spelled in ("chat_template", "chatTemplate"):
        allowed = await _send(callers, route, callers.granted_key, **{spelled: template})
        assert allowed.status_code == 200, allowed.text
        assert (await _engine_requests(callers.gw))[-1][spelled] == template
    nested = await _send(
        callers, route, callers.granted_key, chat_template_kwargs={"chat_template": template}
    )
    assert nested.status_code == 200, nested.text
    # The same user's other credentials, and another key's field, are still refused.
    for key, name in (
        (callers.alice_key, "chat_template"),
        (callers.alice_token, "chat_template"),
        (callers.granted_key, "vllm_xargs"),
    ):
        refused = await _send(callers, route, key, **{name: template})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == name


@pytest.mark.parametrize("route", ROUTES)
async def test_a_tier_setting_allows_a_field_for_that_tier_only(
    callers: Callers, route: str
) -> None:
    xargs = {"custom_plugin_arg": [1, "two"]}
    allowed = await _send(callers, route, callers.premium_key, vllm_xargs=xargs)
    assert allowed.status_code == 200, allowed.text
    assert (await _engine_requests(callers.gw))[-1]["vllm_xargs"] == xargs
    for key in (callers.standard_key, callers.alice_key):
        refused = await _send(callers, route, key, vllm_xargs=xargs)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "vllm_xargs"
    # A tier grant never reaches a routing field, whatever its spelling.
    routed = await _send(callers, route, callers.premium_key, apiBase="http://evil.test/v1")
    assert routed.status_code == 400, routed.text


async def test_only_an_admin_allows_fields_and_never_a_routing_one(callers: Callers) -> None:
    http = callers.gw.http
    as_alice = bearer(callers.alice_token)
    keys_before = (await http.get("/admin/api/keys", headers=ADMIN)).json()["data"]
    # A user cannot give her own new key fields: the self-service body has no such field.
    own = await http.post("/api/keys", headers=as_alice, json={"allowed_fields": ["chat_template"]})
    assert own.status_code == 400, own.text
    assert own.json()["error"]["param"] == "allowed_fields"
    # Nor change an existing key's, with her login or with the key itself.
    for credentials in (as_alice, bearer(callers.alice_key)):
        changed = await http.put(
            f"/admin/api/keys/{callers.alice_key_id}",
            headers=credentials,
            json={"allowed_fields": ["chat_template"]},
        )
        assert changed.status_code == 403, changed.text
    # An admin cannot allow a routing field either (the key is not created).
    for spelled in ("api_base", "extra_headers", "API-KEY"):
        routed = await http.post(
            "/admin/api/keys", headers=ADMIN, json={"user_id": "alice", "allowed_fields": [spelled]}
        )
        assert routed.status_code == 400, routed.text
        assert routed.json()["error"]["param"] == "allowed_fields.0"
    keys_after = (await http.get("/admin/api/keys", headers=ADMIN)).json()["data"]
    assert keys_after == keys_before
    mine = (await http.get("/api/keys", headers=as_alice)).json()["data"]
    assert {k["id"]: k["allowed_fields"] for k in mine}[callers.alice_key_id] == []
    refused = await _send(callers, CHAT, callers.alice_key, chat_template="{{ x }}")
    assert refused.status_code == 400


async def test_an_admin_grant_takes_effect_and_is_withdrawn_at_once(callers: Callers) -> None:
    http = callers.gw.http
    created = await create_key(http, "alice")
    key, key_id = created["key"], created["id"]
    before = await _send(callers, CHAT, key, mm_processor_kwargs={"num_crops": 4})
    assert before.status_code == 400
    granted = await http.put(
        f"/admin/api/keys/{key_id}", headers=ADMIN, json={"allowed_fields": ["mmProcessorKwargs"]}
    )
    assert granted.status_code == 200, granted.text
    assert granted.json()["allowed_fields"] == ["mmProcessorKwargs"]
    during = await _send(callers, CHAT, key, mm_processor_kwargs={"num_crops": 4})
    assert during.status_code == 200, during.text
    cleared = await http.put(
        f"/admin/api/keys/{key_id}", headers=ADMIN, json={"allowed_fields": None}
    )
    assert cleared.json()["allowed_fields"] == []
    after = await _send(callers, CHAT, key, mm_processor_kwargs={"num_crops": 4})
    assert after.status_code == 400, after.text


async def test_the_document_states_the_policy(callers: Callers) -> None:
    document = (await callers.gw.http.get("/openapi.json")).json()
    schemas = document["components"]["schemas"]
    assert schemas["RequestFieldName"]["not"]["pattern"] == REFUSED_NAME_PATTERN
    ref = REQUEST_FIELD_REF
    for path in (CHAT, COMPLETIONS, EMBEDDINGS):
        body = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert ref in str(body["schema"]["propertyNames"])
    chat = schemas["ChatRequest"]
    assert ref in str(chat["propertyNames"])
    assert chat["additionalProperties"] is True
    item = schemas["AdminKeyCreate"]["properties"]["allowed_fields"]["anyOf"][0]["items"]
    assert item == {"$ref": "#/components/schemas/GrantableFieldName"}
    assert "allowed_fields" not in schemas["MyKeyCreate"]["properties"]
