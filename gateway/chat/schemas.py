"""The body of POST /api/chat."""

from __future__ import annotations

import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, StringConstraints

from gateway.conversations.schemas import Text
from gateway.text import NoNul

StrictNumber = Annotated[float, Strict()]


class ChatMessage(BaseModel):
    """A message the client adds to the conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(BaseModel):
    """Send a message to a conversation (a new one when `conversation_id` is absent).

    `message` is one user message; `messages` adds several (system, earlier turns) ending with
    the user's. `action`: `send` (default), `regenerate` (replace the last reply) or `edit`
    (replace the last user message with `message` and answer it again). Sampling parameters
    pass to the engine.
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "current", "message": "안녕하세요!", "stream": True}]
        },
    )

    conversation_id: uuid.UUID | None = None
    model: Annotated[str, StringConstraints(min_length=1, max_length=256), NoNul] | None = None
    message: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=1000)] | None = None
    action: Literal["send", "regenerate", "edit"] = "send"
    # Strict: "stream": "yes" or "temperature": "0.5" are errors, not coerced.
    stream: StrictBool = False
    # The same ranges the OpenAI routes check (gateway/proxy/validation.py); the upper cap of
    # max_tokens is configured (MAX_TOKENS_CAP) and checked when the request is relayed.
    temperature: Annotated[StrictNumber, Field(ge=0, le=2)] | None = None
    top_p: Annotated[StrictNumber, Field(ge=0, le=1)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    presence_penalty: Annotated[StrictNumber, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[StrictNumber, Field(ge=-2, le=2)] | None = None
    seed: StrictInt | None = None
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
