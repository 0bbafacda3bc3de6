"""The OpenAPI document, made to say what the gateway really answers.

FastAPI's defaults describe a different service: a 422 `HTTPValidationError` for bad input
(the gateway answers 400 with its error envelope), no authentication, and no body at all for
the OpenAI routes (they read the body raw). This module fixes the document once, when it is
first requested:

- every error response carries the one envelope (`ErrorResponse`), and `default` documents
  the errors any route can give (401, 403, 413, 429, 503, ...);
- FastAPI's validation 422 becomes the gateway's 400;
- every operation outside `PUBLIC_OPERATIONS` declares bearer authentication (a JWT or an
  API key), so clients and API fuzzers know which routes need credentials;
- the OpenAI routes get their request bodies with the configured caps (proxy/docs.py), and
  /api/chat's `max_tokens` the same cap (its sampling parameters get the same checks).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.errors import speaks_anthropic
from gateway.fields import field_schemas
from gateway.proxy.docs import request_body
from gateway.proxy.service import limits_from
from gateway.proxy.validation import OPENAI_PATHS, UPSTREAM_PATHS, Route
from gateway.settings import Settings

# Operations that need no credentials (tests/gateway/test_route_inventory.py holds the full
# list with the reason for each, and checks this one against the document).
PUBLIC_OPERATIONS = frozenset(
    {
        ("get", "/"),
        ("get", "/health"),
        ("get", "/health/ready"),
        ("post", "/api/auth/login"),
        ("post", "/admin/api/login"),
        ("post", "/api/auth/refresh"),
        ("post", "/api/auth/logout"),
    }
)
BEARER_SCHEME = "bearer"
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_ERROR_CONTENT = {"application/json": {"schema": _ERROR_REF}}
# The OpenAI routes also pass engine errors through, with the engine's status and body.
_RELAYED_ERROR_CONTENT = {
    "application/json": {
        "schema": {"anyOf": [_ERROR_REF, {"$ref": "#/components/schemas/UpstreamError"}]}
    }
}
# Anthropic's routes answer in Anthropic's envelope (gateway.errors.speaks_anthropic).
_ANTHROPIC_ERROR_CONTENT = {
    "application/json": {
        "schema": {
            "anyOf": [
                {"$ref": "#/components/schemas/AnthropicErrorResponse"},
                {"$ref": "#/components/schemas/UpstreamError"},
            ]
        }
    }
}
_ERROR_SCHEMAS: dict[str, Any] = {
    "AnthropicErrorResponse": {
        "title": "AnthropicErrorResponse",
        "description": "Anthropic's error envelope, on /v1/messages and its subroutes.",
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {
                    "type": {"type": "string", "examples": ["invalid_request_error"]},
                    "message": {"type": "string"},
                },
            },
        },
    },
    "ErrorResponse": {
        "title": "ErrorResponse",
        "description": "The one error envelope (OpenAI's shape). `X-Error-Source: gateway` marks "
        "errors the gateway made; engine errors pass through with their own body.",
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"$ref": "#/components/schemas/ErrorDetail"}},
    },
    "UpstreamError": {
        "title": "UpstreamError",
        "description": "An engine's own error body, passed through with its status "
        "(`X-Error-Source: upstream`); vLLM's shape varies between versions.",
        "type": "object",
    },
    "ErrorDetail": {
        "title": "ErrorDetail",
        "type": "object",
        "required": ["message", "type"],
        "properties": {
            "message": {"type": "string"},
            "type": {"type": "string", "examples": ["invalid_request_error"]},
            "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
    },
}
_HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def _is_fastapi_validation(response: dict[str, Any]) -> bool:
    schema = response.get("content", {}).get("application/json", {}).get("schema", {})
    return bool(schema.get("$ref", "").endswith("/HTTPValidationError"))


def _fix_responses(responses: dict[str, Any], *, relayed: bool, anthropic: bool = False) -> None:
    validation = responses.get("422")
    if validation is not None and _is_fastapi_validation(validation):
        del responses["422"]
        responses.setdefault("400", {"description": "Invalid request; `param` names the bad field"})
    content: dict[str, Any]
    if anthropic:
        content = _ANTHROPIC_ERROR_CONTENT
    else:
        content = _RELAYED_ERROR_CONTENT if relayed else _ERROR_CONTENT
    for status, response in responses.items():
        if status[:1] in {"4", "5"}:
            response["content"] = content
    responses["default"] = {
        "description": "Any other error (401 without credentials, 403, 413, 429 with "
        "Retry-After, 503 with Retry-After, ...), in the error envelope",
        "content": content,
    }


def _cap_chat_max_tokens(schemas: dict[str, Any], max_tokens: int, max_n: int) -> None:
    # ChatRequest is defined in gateway.chat, a layer above this one: found by name. Its
    # min_tokens is checked against the same cap as max_tokens.
    properties = schemas.get("ChatRequest", {}).get("properties", {})
    caps = {
        "max_tokens": max_tokens,
        "min_tokens": max_tokens,
        "max_completion_tokens": max_tokens,
        "n": max_n,
        "best_of": max_n,
    }
    for name, cap in caps.items():
        field = properties.get(name, {})
        for branch in field.get("anyOf", [field]):
            if branch.get("type") == "integer":
                branch["maximum"] = min(cap, branch.get("maximum", cap))


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The document for this app and settings."""
    document = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas.update(_ERROR_SCHEMAS)
    # The field policy's names (gateway.fields), referred to by the bodies of /v1/*, /api/chat
    # and the admin key routes.
    schemas.update(field_schemas())
    components["securitySchemes"] = {
        BEARER_SCHEME: {
            "type": "http",
            "scheme": "bearer",
            "description": "An access token from /api/auth/login, or an API key (sk-...).",
        }
    }
    limits = limits_from(settings)
    _cap_chat_max_tokens(schemas, limits.max_tokens, limits.max_n)
    bodies = OPENAI_PATHS
    for path, operations in document.get("paths", {}).items():
        for method, operation in operations.items():
            if method not in _HTTP_METHODS:
                continue
            relayed = path in bodies or path == UPSTREAM_PATHS[Route.TRANSCRIPTIONS]
            _fix_responses(
                operation.setdefault("responses", {}),
                relayed=relayed,
                anthropic=speaks_anthropic(path),
            )
            if (method, path) not in PUBLIC_OPERATIONS:
                operation["security"] = [{BEARER_SCHEME: []}]
            if method == "post" and path in bodies:
                operation["requestBody"] = request_body(bodies[path], limits)
    return document


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve `build_openapi`'s document (built once, on first request) as /openapi.json."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
