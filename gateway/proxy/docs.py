"""The OpenAPI description of the OpenAI request bodies: what validation.py checks, no more.

The bodies are read raw and forwarded as sent (see router.py), so nothing here parses them;
these schemas only tell clients and API fuzzers what the gateway accepts. Every field the
gateway does not check stays open (`additionalProperties`), as the engine defines it, within
the field policy of gateway.fields (`propertyNames`).
"""

from __future__ import annotations

from typing import Any

from gateway.fields import TEMPLATE_KWARGS_SCHEMA, checked_integer_schemas, field_names_schema
from gateway.proxy.validation import (
    CHAT_ROLES,
    MAX_TOKEN_ID,
    Limits,
    Route,
)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    # null means "not set" to the gateway and the engines, as in OpenAI's API.
    return {"anyOf": [schema, {"type": "null"}]}


def _sampling(limits: Limits) -> dict[str, Any]:
    integer_cap = _nullable({"type": "integer", "minimum": 1, "maximum": limits.max_tokens})
    return {
        "model": {
            **_nullable({"type": "string", "minLength": 1, "maxLength": 256}),
            "description": 'A served name or alias; "current", null or absent: the active model.',
        },
        "stream": {"type": "boolean"},
        "stream_options": _nullable({"type": "object"}),
        "max_tokens": integer_cap,
        "max_completion_tokens": integer_cap,
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": limits.max_n}),
        "best_of": _nullable({"type": "integer", "minimum": 1, "maximum": limits.max_n}),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2}),
        "top_p": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
        "presence_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "frequency_penalty": _nullable({"type": "number", "minimum": -2, "maximum": 2}),
        "chat_template_kwargs": TEMPLATE_KWARGS_SCHEMA,
        **checked_integer_schemas(limits.max_tokens, limits.max_n),
    }


_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"type": "string", "enum": sorted(CHAT_ROLES)},
        "content": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object"}},
                {"type": "null"},
            ]
        },
    },
    # Content is required, except that an assistant's may be null or absent (a tool call).
    "anyOf": [
        {"required": ["content"], "properties": {"content": {"type": ["string", "array"]}}},
        {"properties": {"role": {"const": "assistant"}, "content": {"type": "null"}}},
    ],
}
_TEXT = {"type": "string", "minLength": 1}
_TOKEN_IDS = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "integer", "minimum": 0, "maximum": MAX_TOKEN_ID},
}
# What validation.py lets through: the shapes every engine takes.
_PROMPT = {
    "anyOf": [
        _TEXT,
        {"type": "array", "minItems": 1, "items": _TEXT},
        _TOKEN_IDS,
        {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
    ],
}
_EXAMPLES: dict[Route, dict[str, Any]] = {
    Route.CHAT: {
        "model": "current",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 100,
        "stream": False,
    },
    Route.COMPLETIONS: {"model": "current", "prompt": "Once upon a time", "max_tokens": 32},
    Route.EMBEDDINGS: {"model": "current", "input": "Hello"},
}


def request_body_schema(route: Route, limits: Limits) -> dict[str, Any]:
    """The JSON schema of one route's body under these caps."""
    properties = _sampling(limits)
    if route is Route.CHAT:
        properties["messages"] = {"type": "array", "minItems": 1, "items": _MESSAGE}
        required = ["messages"]
    elif route is Route.COMPLETIONS:
        properties["prompt"] = _PROMPT
        required = ["prompt"]
    else:
        # validation.py applies the same caps here, so they are documented too.
        properties["input"] = _PROMPT
        required = ["input"]
    schema: dict[str, Any] = {
        "type": "object",
        "required": required,
        "properties": properties,
        # Routing fields (CVE-2024-6587), code the engine would run, and unknown names that
        # look like either are refused (gateway.fields).
        "propertyNames": field_names_schema(),
        "additionalProperties": True,
    }
    if route is not Route.EMBEDDINGS:
        # stream_options only with "stream": true (`properties` holds for an absent name).
        schema["anyOf"] = [
            {"properties": {"stream_options": {"type": "null"}}},
            {"required": ["stream"], "properties": {"stream": {"const": True}}},
        ]
    return schema


def request_body(route: Route, limits: Limits) -> dict[str, Any]:
    """The OpenAPI `requestBody` object of one route."""
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": request_body_schema(route, limits),
                "example": _EXAMPLES[route],
            }
        },
    }
