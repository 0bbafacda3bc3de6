"""Request checks for the OpenAI routes: enough for clear 400s, everything else passes through.

Hand-written on purpose: the body is forwarded as the client sent it, so it is parsed once with
orjson and only the fields the gateway acts on are checked (a pydantic model per route would
re-serialise every request and cost more than the rest of the proxy path).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

import orjson

from gateway.body import check_json_shape, orjson_refusal
from gateway.errors import GatewayError
from gateway.fields import JSON_SAFE_INTEGER, check_fields
from gateway.integers import whole_number
from gateway.proxy.checks import (
    bad,
    check_anthropic_messages,
    check_rerank,
    check_responses,
    check_score,
    check_tokenize,
    integer_field,
    number_field,
)

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


class Route(StrEnum):
    """The engine routes the proxy serves."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"
    COUNT_TOKENS = "count_tokens"
    RERANK = "rerank"
    SCORE = "score"
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    TRANSCRIPTIONS = "transcriptions"


# Each route's path: the gateway serves it where vLLM does, and relays it to the same path.
UPSTREAM_PATHS = {
    Route.CHAT: "/v1/chat/completions",
    Route.COMPLETIONS: "/v1/completions",
    Route.EMBEDDINGS: "/v1/embeddings",
    Route.RESPONSES: "/v1/responses",
    Route.MESSAGES: "/v1/messages",
    Route.COUNT_TOKENS: "/v1/messages/count_tokens",
    Route.RERANK: "/v1/rerank",
    Route.SCORE: "/v1/score",
    Route.TOKENIZE: "/tokenize",
    Route.DETOKENIZE: "/detokenize",
    Route.TRANSCRIPTIONS: "/v1/audio/transcriptions",
}
# The routes whose streams are named events (`event:` lines) ending with a terminal event, not
# `data: [DONE]`; relayed event by event with their names.
NAMED_EVENT_ROUTES = frozenset({Route.RESPONSES, Route.MESSAGES})
# Anthropic's routes: their errors take Anthropic's envelope (gateway.errors).
ANTHROPIC_ROUTES = frozenset({Route.MESSAGES, Route.COUNT_TOKENS})
# Routes that generate tokens the limits count; the others are metered by requests only.
GENERATING_ROUTES = frozenset({Route.CHAT, Route.COMPLETIONS, Route.RESPONSES, Route.MESSAGES})
# Seed 004's paths for the same routes (its clients post there; a body without `model` means
# the default model, as on /v1/*).
SEED_PATHS = {
    Route.CHAT: "/api/v1/chat/completions",
    Route.COMPLETIONS: "/api/v1/completions",
    Route.EMBEDDINGS: "/api/v1/embeddings",
}
# Every path the gateway serves a JSON engine route at, and the route (the multipart
# transcription route is not one).
OPENAI_PATHS = {
    **{path: route for route, path in UPSTREAM_PATHS.items() if route is not Route.TRANSCRIPTIONS},
    **{path: route for route, path in SEED_PATHS.items()},
}


@dataclass(frozen=True)
class Limits:
    """Configured caps on what one request may ask for."""

    max_n: int
    max_tokens: int
    max_body_bytes: int
    max_json_depth: int


@dataclass
class ProxyRequest:
    """A checked request: the parsed body and what the proxy needs from it."""

    route: Route
    body: dict[str, Any]
    model: str | None
    stream: bool
    client_wants_usage: bool
    # A multipart route's file field: (field name, file name, content type, bytes).
    upload: tuple[str, str, str, bytes] | None = None


_bad = bad
_number = number_field
_integer = integer_field


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list.", "messages")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict):
            raise _bad(f"'{where}' must be an object with 'role' and 'content'.", where)
        role = message.get("role")
        # isinstance first: an unhashable role ({} or []) must be a 400, not a TypeError.
        if not isinstance(role, str) or role not in CHAT_ROLES:
            allowed = ", ".join(sorted(CHAT_ROLES))
            raise _bad(f"'{where}.role' must be one of {allowed}; got {role!r}.", f"{where}.role")
        content = message.get("content")
        if content is None and role == "assistant":
            continue
        if not isinstance(content, str | list):
            raise _bad(
                f"'{where}.content' must be a string or a list of parts.", f"{where}.content"
            )


# Token ids index a vocabulary: no engine has more than 2^31 of them, and the bound keeps a
# client's 1e25 from becoming an integer the upstream body cannot carry.
MAX_TOKEN_ID = 2**31 - 1


def _token_ids(value: object) -> list[int] | None:
    """A non-empty list of token ids (whole numbers from 0) as ints; None if it is not one."""
    if not isinstance(value, list) or not value:
        return None
    ids = [whole_number(token) for token in value]
    if any(token is None or not 0 <= token <= MAX_TOKEN_ID for token in ids):
        return None
    return cast(list[int], ids)


def _check_prompt(body: dict[str, Any], name: str) -> None:
    # The shapes every engine takes (vLLM's str | list[str] | list[int] | list[list[int]]; it
    # refuses an empty prompt), token ids sent on as ints (4.0 is the integer 4 to JSON Schema).
    value = body.get(name)
    if isinstance(value, str) and value:
        return
    ids = _token_ids(value)
    if ids is not None:
        body[name] = ids
        return
    if isinstance(value, list) and value:
        if all(isinstance(item, str) and item for item in value):
            return
        lists = [_token_ids(item) for item in value]
        if all(item is not None for item in lists):
            body[name] = lists
            return
    raise _bad(
        f"'{name}' must be a non-empty string, a non-empty list of them, a non-empty list of "
        f"token ids (integers from 0 to {MAX_TOKEN_ID}) or a non-empty list of such lists.",
        name,
    )


def _check_route(route: Route, body: dict[str, Any], limits: Limits) -> bool:
    """The route's own checks; whether the route can stream."""
    if route is Route.CHAT:
        _check_messages(body.get("messages"))
    elif route is Route.COMPLETIONS:
        _check_prompt(body, "prompt")
    elif route is Route.EMBEDDINGS:
        _check_prompt(body, "input")
        return False
    elif route is Route.RESPONSES:
        check_responses(body, limits.max_tokens)
    elif route in ANTHROPIC_ROUTES:
        check_anthropic_messages(body, limits.max_tokens, counting=route is Route.COUNT_TOKENS)
        return route is Route.MESSAGES
    elif route is Route.RERANK:
        check_rerank(body)
        return False
    elif route is Route.SCORE:
        check_score(body)
        return False
    elif route is Route.TOKENIZE:
        check_tokenize(body, _check_messages)
        return False
    elif route is Route.DETOKENIZE:
        tokens = _token_ids(body.get("tokens"))
        if tokens is None:
            raise _bad(
                f"'tokens' must be a non-empty list of token ids (0 to {MAX_TOKEN_ID}).", "tokens"
            )
        body["tokens"] = tokens
        return False
    return True


def parse_request(
    route: Route, raw: bytes, limits: Limits, grants: Iterable[str] = ()
) -> ProxyRequest:
    """Parse and check one request body; raise a 400 GatewayError naming the field.

    `grants`: the request fields an admin allowed this caller beyond the policy of
    gateway.fields (routing fields such as `api_base` and code the engine would run, such as
    `chat_template`, are refused without one).
    """
    if len(raw) > limits.max_body_bytes:  # the route's cap: read_capped_body's, again
        raise GatewayError(
            413,
            f"Request body is {len(raw)} bytes; the limit is {limits.max_body_bytes}.",
            code="body_too_large",
        )
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise orjson_refusal(exc, limits.max_json_depth) from None
    if not isinstance(body, dict):
        raise _bad("Request body must be a JSON object.", None, "invalid_json")
    # Before anything walks it, and because the body is re-serialized to be relayed.
    check_json_shape(body, max_depth=limits.max_json_depth)
    check_fields(body, grants)
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
        raise _bad("'model' must be a non-empty string.", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false.", "stream")
    stream = _check_route(route, body, limits) and stream
    _integer(body, "max_tokens", 1, limits.max_tokens)
    _integer(body, "max_completion_tokens", 1, limits.max_tokens)
    _integer(body, "n", 1, limits.max_n)
    _integer(body, "best_of", 1, limits.max_n)
    # Within what vLLM takes (64 bits) and what every JSON client holds exactly: past 2^53 a
    # client's number may already be a float that lost digits (the /api/chat bound too).
    _integer(body, "seed", -JSON_SAFE_INTEGER, JSON_SAFE_INTEGER)
    # vLLM's integer sampling extras: bounded here too, so a 2**70 that parsing turned into a
    # float is a 400 naming the field rather than whatever the engine makes of it.
    _integer(body, "top_k", -1, JSON_SAFE_INTEGER)
    _integer(body, "min_tokens", 0, limits.max_tokens)
    _number(body, "temperature", 0.0, 2.0)
    _number(body, "top_p", 0.0, 1.0)
    _number(body, "presence_penalty", -2.0, 2.0)
    _number(body, "frequency_penalty", -2.0, 2.0)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _bad("'stream_options' must be an object.", "stream_options")
        if not stream and route in (Route.CHAT, Route.COMPLETIONS):
            # vLLM's (and OpenAI's) rule, checked here so that the document can state it.
            raise _bad("'stream_options' needs 'stream': true.", "stream_options")
    wants_usage = bool(options and options.get("include_usage") is True)
    return ProxyRequest(
        route=route, body=body, model=model, stream=stream, client_wants_usage=wants_usage
    )
