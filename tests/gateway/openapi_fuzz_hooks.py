"""Schemathesis hooks of test_openapi_fuzz: the refusals JSON Schema has no words for.

Loaded by the schemathesis CLI (SCHEMATHESIS_HOOKS). Every other rule the validators enforce
is stated in the OpenAPI document, so `positive_data_acceptance` (ST202: a schema-valid request
refused) runs on every operation; this drops an ST202 only when the gateway's error names one
of the rules below by its code, on an operation that has that rule.
"""

from __future__ import annotations

from typing import Any

import schemathesis

# Error code -> the operations that may answer it to a schema-valid request, and why.
UNSTATABLE_RULES: dict[str, tuple[frozenset[str], str]] = {
    "invalid_expiry": (
        frozenset({"POST /api/keys", "POST /admin/api/keys", "PUT /admin/api/keys/{key_id}"}),
        "an expires_at must be in the future: a schema cannot compare with the present",
    ),
    "invalid_last_message": (
        frozenset({"POST /api/chat", "POST /api/chat/completions"}),
        "the last of `messages` must be a user message with text: JSON Schema can say what "
        "every item or the first items must be, not the last",
    ),
    "score_lengths": (
        frozenset({"POST /v1/score"}),
        "two lists to score pair one to one (or one to many): JSON Schema cannot compare the "
        "lengths of two arrays",
    ),
    "tool_choice_unknown": (
        frozenset({"POST /v1/messages", "POST /v1/messages/count_tokens"}),
        "a tool_choice names one of the request's tools: JSON Schema cannot say that a value "
        "is one of the values of another field",
    ),
    "idempotency_key_reused": (
        frozenset({"POST /api/chat", "POST /api/chat/completions"}),
        "an Idempotency-Key sent before with another body is a 422 (as the IETF draft on the "
        "header says): it depends on earlier requests, not on this one",
    ),
}


# Operations whose engine may refuse a schema-valid request for a rule only the engine knows
# (an engine's 400, `X-Error-Source: upstream`), and why.
ENGINE_RULES: dict[str, str] = {
    "POST /detokenize": "token ids must be in the model's vocabulary, whose size is the "
    "engine's (the gateway bounds them at 2^31 - 1, past any real vocabulary)",
    "POST /v1/audio/transcriptions": "the file must be audio the engine can decode: a schema "
    "says it is binary, not that it is sound",
}


def _engine_refusal(case: Any, response: Any) -> bool:
    # Schemathesis's headers: lower-cased names, each with its list of values.
    source = response.headers.get("x-error-source") or []
    return (
        case.operation.label in ENGINE_RULES
        and response.status_code == 400
        and "upstream" in source
    )


# Anthropic's envelope has no code: its messages for the rules above (gateway/proxy/checks.py).
ANTHROPIC_MESSAGES = {
    "'tool_choice.name' must be the name of one of 'tools'.": "tool_choice_unknown",
}


def _error_code(response: Any) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    if code is None and isinstance(error, dict) and body.get("type") == "error":
        code = ANTHROPIC_MESSAGES.get(str(error.get("message")))
    return code if isinstance(code, str) else None


@schemathesis.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure but an ST202 whose error names a rule above for its operation."""
    if failure.code != "ST202":
        return True
    if _engine_refusal(case, response):
        return False
    rule = UNSTATABLE_RULES.get(_error_code(response) or "")
    return rule is None or case.operation.label not in rule[0]
