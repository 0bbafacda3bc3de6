"""/api/chat under the caller's limits: a key's allowed models and the tier's token budget are
checked before anything is saved or sent (real Postgres, the simulator engine)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.limits.base import Decision
from gateway.limits.rules import tier_rules
from tests.helpers.chat import chat, messages
from tests.helpers.polling import eventually
from tests.helpers.proxy import Gateway, sim_profile
from tests.helpers.quota import (
    bearer,
    create_key,
    create_user,
    error_code,
    quota_gateway,
    quota_settings,
)

pytestmark = pytest.mark.postgres

PROFILES = {
    "sim-a": sim_profile("sim-a", "--response-tokens", "6"),
    "sim-b": sim_profile("sim-b", "--response-tokens", "6"),
}


async def _engine_calls(gw: Gateway) -> int:
    return int((await gw.sim_stats())["requests_total"])


async def _titles(http: httpx.AsyncClient, token: str) -> list[str]:
    reply = await http.get("/api/conversations", headers=bearer(token))
    assert reply.status_code == 200, reply.text
    return [c["title"] for c in reply.json()["data"]]


async def test_a_key_limited_to_some_models_gets_403_for_others_and_nothing_is_saved(
    pg_url: str,
) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        only_a = (await create_key(http, "alice", allowed_models=["sim-a"]))["key"]
        only_b = (await create_key(http, "alice", allowed_models=["sim-b"]))["key"]
        allowed = await chat(http, only_a, model="sim-a", message="allowed")
        assert allowed.status_code == 200, allowed.text
        conversation_id = allowed.headers["X-Conversation-Id"]
        stored = await messages(http, only_a, conversation_id)
        engine_calls = await _engine_calls(gw)

        refusals: list[tuple[str, dict[str, Any]]] = [
            (only_a, {"model": "sim-b", "message": "new conversation"}),
            (only_a, {"model": "sim-b", "message": "into it", "conversation_id": conversation_id}),
            (only_a, {"model": "sim-b", "action": "regenerate",
                      "conversation_id": conversation_id}),
            (only_a, {"model": "sim-b", "message": "keyed", "stream": True}),
            # sim-a is the loaded model: "current", or no model at all, is sim-a.
            (only_b, {"model": "current", "message": "new conversation"}),
            (only_b, {"message": "into it", "conversation_id": conversation_id}),
        ]  # fmt: skip
        for key, body in refusals:
            refused = await chat(http, key, headers={"Idempotency-Key": "scoped"}, **body)
            assert refused.status_code == 403, (body, refused.text)
            assert error_code(refused) == "model_not_allowed", body
            assert refused.json()["error"]["param"] == "model"
        assert await _engine_calls(gw) == engine_calls
        assert await messages(http, only_a, conversation_id) == stored
        assert await _titles(http, only_a) == ["allowed"]
        # The refused requests left no Idempotency-Key behind: the key is free for a request.
        later = await chat(
            http, only_a, model="sim-a", message="keyed", headers={"Idempotency-Key": "scoped"}
        )
        assert later.status_code == 200, later.text
        assert "Idempotent-Replayed" not in later.headers


async def test_the_tiers_token_budget_applies_to_chat_and_a_refusal_saves_nothing(
    pg_url: str,
) -> None:
    budget_tokens = 10  # one reply (6 tokens and the prompt's) spends it all
    settings = quota_settings(
        pg_url,
        profiles=PROFILES,
        RATE_LIMIT_STANDARD_PER_MINUTE=100,
        RATE_LIMIT_STANDARD_PER_HOUR=100,
        RATE_LIMIT_STANDARD_TOKENS_PER_MINUTE=budget_tokens,
    )
    async with quota_gateway(settings) as gw:
        http = gw.http
        await create_user(http, "alice")
        created = await create_key(http, "alice", tier="standard")
        key = created["key"]
        limiter = gw.app.state.resources.limiters.inference
        rules = tier_rules(settings, "standard").tokens

        async def spent() -> Decision | None:
            decision: Decision = await limiter.peek(f"key:{created['id']}", rules)
            return None if decision.allowed else decision

        first = await chat(http, key, message="spend the budget", stream=True)
        assert first.status_code == 200, first.text
        assert first.headers["X-RateLimit-Limit-Tokens-Minute"] == str(budget_tokens)
        conversation_id = first.headers["X-Conversation-Id"]
        # Tokens are counted once the reply has finished, off its path: wait for that.
        await eventually(spent, 10)
        stored = await messages(http, key, conversation_id)
        assert stored[-1]["completion_tokens"] == 6
        engine_calls = await _engine_calls(gw)

        for body in (
            {"message": "and more", "conversation_id": conversation_id},
            {"message": "a new one", "stream": True},
            {"action": "regenerate", "conversation_id": conversation_id},
        ):
            refused = await chat(http, key, **body)
            assert refused.status_code == 429, (body, refused.text)
            assert error_code(refused) == "token_rate_limit_exceeded"
            assert int(refused.headers["Retry-After"]) > 0
        assert await _engine_calls(gw) == engine_calls
        assert await messages(http, key, conversation_id) == stored
        assert await _titles(http, key) == ["spend the budget"]
