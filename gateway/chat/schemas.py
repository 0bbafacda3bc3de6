"""The body of POST /api/chat."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StringConstraints
from pydantic.config import JsonDict, JsonValue

from gateway.conversations.schemas import MAX_TEXT_CHARS, Text
from gateway.fields import TEMPLATE_KWARGS_SCHEMA, checked_integer_schemas, field_names_schema
from gateway.integers import WHOLE_NUMBER
from gateway.text import NoNul, NotBlank

StrictNumber = Annotated[float, Strict()]
# A user's turn: never empty or whitespace only, whatever the action.
UserText = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS), NoNul, NotBlank]


def _present(name: str, json_type: str) -> JsonDict:
    return {"required": [name], "properties": {name: {"type": json_type}}}


def _null(name: str) -> JsonDict:
    return {"properties": {name: {"type": "null"}}}


def _action_is(action: str) -> JsonDict:
    return {"required": ["action"], "properties": {"action": {"const": action}}}


# The rules between fields, in the document so that clients and fuzzers see them (the service
# checks the same, in chat.service.new_messages), one branch per action, written without
# if/then/not (generators widen those away). The one rule JSON Schema cannot say: the last of
# `messages` must be a user message with text (400 invalid_last_message).
_ACTIONS: list[JsonValue] = [
    {
        # A send (also when `action` is absent: `properties` holds for an absent name):
        # `message` or `messages`, not both.
        "properties": {"action": {"const": "send"}},
        "anyOf": [
            {"allOf": [_present("message", "string"), _null("messages")]},
            {"allOf": [_present("messages", "array"), _null("message")]},
        ],
    },
    {
        "allOf": [
            _action_is("regenerate"),
            _present("conversation_id", "string"),
            _null("message"),
            _null("messages"),
        ]
    },
    {
        "allOf": [
            _action_is("edit"),
            _present("conversation_id", "string"),
            _present("message", "string"),
            _null("messages"),
        ]
    },
]


# Engine fields /api/chat sets itself or that would change the one reply it stores per turn.
CHAT_OWNED_FIELDS = frozenset({"n", "echo", "stream_options"})


def _chat_schema(schema: dict[str, Any]) -> None:
    # Any other field goes to the engine under the proxy's policy (gateway.fields), so the
    # document states the same names as the OpenAI routes, plus this body's own.
    schema["examples"] = [{"model": "current", "message": "안녕하세요!", "stream": True}]
    schema["anyOf"] = _ACTIONS
    schema["propertyNames"] = field_names_schema(
        also=ChatRequest.model_fields, refused=CHAT_OWNED_FIELDS
    )
    schema["properties"]["chat_template_kwargs"] = TEMPLATE_KWARGS_SCHEMA
    # The engine's integer fields the proxy checks, unless this body declares them itself.
    for name, field in checked_integer_schemas().items():
        if name not in CHAT_OWNED_FIELDS:
            schema["properties"].setdefault(name, field)


class ChatMessage(BaseModel):
    """A message the client adds to the conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(BaseModel):
    """Send a message to a conversation (a new one when `conversation_id` is absent).

    `message` is one user message; `messages` adds several (system, earlier turns) ending with
    the user's (not both). `action`: `send` (default), `regenerate` (replace the last reply; no
    message, a `conversation_id`) or `edit` (replace the last user message with `message` and
    answer it again; a `conversation_id`). Sampling parameters pass to the engine, and so do
    other engine fields (e.g. `response_format`, `chat_template_kwargs`) under the same field
    policy as /v1/chat/completions; `n`, `echo` and `stream_options` are refused (one reply is
    kept per turn).
    """

    model_config = ConfigDict(extra="allow", json_schema_extra=_chat_schema)

    conversation_id: uuid.UUID | None = None
    model: Annotated[str, StringConstraints(min_length=1, max_length=256), NoNul] | None = None
    message: UserText | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)] | None = None
    action: Literal["send", "regenerate", "edit"] = "send"
    # Strict: "stream": "yes" or "temperature": "0.5" are errors, not coerced.
    stream: StrictBool = False
    # The same ranges the OpenAI routes check (gateway/proxy/validation.py); the upper cap of
    # max_tokens is configured (MAX_TOKENS_CAP), checked when the request is relayed and
    # written into the document (gateway/openapi.py).
    temperature: Annotated[StrictNumber, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictNumber, Field(ge=0, le=1)] | None = None
    # 2^31 - 1 bounds what a 1e25 could become (above any context, so above a sane cap).
    max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1), WHOLE_NUMBER] | None = None
    presence_penalty: Annotated[StrictNumber, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[StrictNumber, Field(ge=-2, le=2)] | None = None
    # Within what vLLM takes (64 bits) and what every JSON client holds exactly (2^53 - 1).
    seed: Annotated[int, Field(ge=-(2**53 - 1), le=2**53 - 1), WHOLE_NUMBER] | None = None
    stop: str | Annotated[list[str], Field(max_length=8)] | None = None

    def sampling(self) -> dict[str, object]:
        """The sampling parameters the client set."""
        names = (
            "temperature",
            "top_p",
            "max_tokens",
            "presence_penalty",
            "frequency_penalty",
            "seed",
            "stop",
        )
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}
