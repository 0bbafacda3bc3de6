"""The OpenAPI description of the OpenAI request bodies: what validation.py checks, no more.

The bodies are read raw and forwarded as sent (see router.py), so nothing here parses them;
these schemas only tell clients and API fuzzers what the gateway accepts. Every field the
gateway does not check stays open (`additionalProperties`), as the engine defines it, within
the field policy of gateway.fields (`propertyNames`).
"""

from __future__ import annotations

from typing import Any

from gateway.fields import TEMPLATE_KWARGS_SCHEMA, checked_integer_schemas, field_names_schema
from gateway.proxy.checks import (
    ANTHROPIC_ROLES,
    RESPONSES_ITEM_FIELDS,
    RESPONSES_ROLES,
    SCORE_PAIRS,
    TOOL_CHOICE_TYPES,
)
from gateway.proxy.validation import (
    ANTHROPIC_ROUTES,
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
_TEXTS = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
    ]
}
_ANTHROPIC_BLOCKS = {
    "anyOf": [
        {"type": "string"},
        {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {"type": {"type": "string"}},
            },
        },
    ]
}
_ANTHROPIC_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": sorted(ANTHROPIC_ROLES)},
        "content": _ANTHROPIC_BLOCKS,
    },
}


_INPUT_ITEM = {
    "anyOf": [
        {
            "type": "object",
            "required": ["role", "content"],
            "properties": {
                "type": {"const": "message"},
                "role": {"type": "string", "enum": list(RESPONSES_ROLES)},
                "content": {
                    "anyOf": [
                        {"type": "string"},
                        {"type": "array", "items": {"type": "object"}},
                    ]
                },
            },
        },
        *(
            {
                "type": "object",
                "required": ["type", *fields],
                "properties": {
                    "type": {"const": kind},
                    **{field: {"type": "string"} for field in fields},
                },
            }
            for kind, fields in RESPONSES_ITEM_FIELDS.items()
        ),
    ]
}


def _responses_properties(limits: Limits) -> dict[str, Any]:
    return {
        "input": {
            "anyOf": [_TEXT, {"type": "array", "minItems": 1, "items": _INPUT_ITEM}],
            "description": "A prompt, or the conversation as input items (messages, and "
            "function calls with their outputs).",
        },
        "instructions": _nullable({"type": "string"}),
        "max_output_tokens": _nullable(
            {"type": "integer", "minimum": 1, "maximum": limits.max_tokens}
        ),
        "previous_response_id": {
            "type": "null",
            "description": "Responses are not stored here: send earlier turns as input items.",
        },
        "conversation": {"type": "null"},
        "background": _nullable({"const": False}),
    }


def _messages_properties(limits: Limits, *, counting: bool) -> dict[str, Any]:
    cap = {"type": "integer", "minimum": 1, "maximum": limits.max_tokens}
    return {
        "messages": {"type": "array", "minItems": 1, "items": _ANTHROPIC_MESSAGE},
        "system": _nullable(_ANTHROPIC_BLOCKS),
        "max_tokens": _nullable(cap) if counting else cap,
        "stop_sequences": _nullable({"type": "array", "items": {"type": "string"}}),
        "tools": _nullable(
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "input_schema"],
                    "properties": {
                        "name": {"type": "string"},
                        "type": _nullable({"const": "custom"}),
                        "input_schema": {"type": "object"},
                    },
                },
            }
        ),
        "tool_choice": _nullable(
            {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"type": "string", "enum": list(TOOL_CHOICE_TYPES)},
                    "name": {"type": "string"},
                },
                "anyOf": [
                    {"properties": {"type": {"enum": ["auto", "any", "none"]}}},
                    {"required": ["name"], "properties": {"name": {"minLength": 1}}},
                ],
            }
        ),
        "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 1}),
    }


def _route_properties(route: Route, limits: Limits) -> tuple[dict[str, Any], list[str]]:
    """The properties of the routes beyond chat, completions and embeddings, and the required."""
    if route is Route.RESPONSES:
        return _responses_properties(limits), ["input"]
    if route is Route.MESSAGES:
        return _messages_properties(limits, counting=False), ["messages", "max_tokens"]
    if route is Route.COUNT_TOKENS:
        return _messages_properties(limits, counting=True), ["messages"]
    if route is Route.RERANK:
        return {
            "query": _TEXT,
            "documents": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "top_n": _nullable({"type": "integer", "minimum": 0}),
        }, ["query", "documents"]
    if route is Route.SCORE:
        sides = {side for pair in SCORE_PAIRS for side in pair}
        return {side: _TEXTS for side in sorted(sides)}, []
    if route is Route.TOKENIZE:
        return {
            "prompt": {"type": "string"},
            "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
        }, []
    return {"tokens": _TOKEN_IDS}, ["tokens"]  # detokenize


_EXAMPLES: dict[Route, dict[str, Any]] = {
    Route.CHAT: {
        "model": "current",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 100,
        "stream": False,
    },
    Route.COMPLETIONS: {"model": "current", "prompt": "Once upon a time", "max_tokens": 32},
    Route.EMBEDDINGS: {"model": "current", "input": "Hello"},
    Route.RESPONSES: {"model": "current", "input": "Hello", "max_output_tokens": 64},
    Route.MESSAGES: {
        "model": "current",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello"}],
    },
    Route.COUNT_TOKENS: {"model": "current", "messages": [{"role": "user", "content": "Hello"}]},
    Route.RERANK: {"model": "current", "query": "cats", "documents": ["a cat", "a car"]},
    Route.SCORE: {"model": "current", "text_1": "cats", "text_2": ["a cat", "a car"]},
    Route.TOKENIZE: {"model": "current", "prompt": "Hello"},
    Route.DETOKENIZE: {"model": "current", "tokens": [1, 2, 3]},
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
    elif route is Route.EMBEDDINGS:
        # validation.py applies the same caps here, so they are documented too.
        properties["input"] = _PROMPT
        required = ["input"]
    else:
        extra, required = _route_properties(route, limits)
        properties.update(extra)
    schema: dict[str, Any] = {
        "type": "object",
        "required": required,
        "properties": properties,
        # Routing fields (CVE-2024-6587), code the engine would run, and unknown names that
        # look like either are refused (gateway.fields).
        "propertyNames": field_names_schema(),
        "additionalProperties": True,
    }
    if route is Route.SCORE:
        # One of vLLM's pairs, both sides present and not null.
        sides = sorted({side for pair in SCORE_PAIRS for side in pair})
        schema["anyOf"] = [
            {
                "required": list(pair),
                "properties": {side: _TEXTS if side in pair else False for side in sides},
            }
            for pair in SCORE_PAIRS
        ]
    if route is Route.TOKENIZE:
        # A prompt or messages, not both.
        schema["oneOf"] = [{"required": ["prompt"]}, {"required": ["messages"]}]
    if route in ANTHROPIC_ROUTES:
        # A tool_choice needs tools to choose from.
        schema["anyOf"] = [
            {"properties": {"tool_choice": {"type": "null"}}},
            {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
        ]
    if route in (Route.CHAT, Route.COMPLETIONS):
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
