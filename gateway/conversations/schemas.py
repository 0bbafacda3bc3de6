"""Request and response bodies of the conversation routes."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
)

from gateway.conversations.models import Conversation, Message
from gateway.integers import WHOLE_NUMBER
from gateway.text import NoNul, NotBlank

# Message text (the chat request's and an import's), up to about a megabyte.
MAX_TEXT_CHARS = 1_000_000
Text = Annotated[str, StringConstraints(max_length=MAX_TEXT_CHARS), NoNul]
Title = Annotated[str, StringConstraints(max_length=200), NoNul]
# Checked as sent (the document's maxLength and pattern are the ones enforced), then stripped.
ModelName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256),
    NoNul,
    NotBlank,
    AfterValidator(str.strip),
]
TokenCount = Annotated[int, Field(ge=0, le=2**31 - 1), WHOLE_NUMBER]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConversationView(BaseModel):
    """A conversation without its messages."""

    id: uuid.UUID
    title: str
    model: str | None
    archived: bool
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Conversation) -> ConversationView:
        """The view of a row."""
        return cls(
            id=row.id,
            title=row.title,
            model=row.model,
            archived=row.archived,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


class MessageView(BaseModel):
    """One message."""

    id: uuid.UUID
    seq: int
    role: str
    content: str
    model: str | None
    status: str
    error: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: datetime

    @classmethod
    def of(cls, row: Message) -> MessageView:
        """The view of a row."""
        return cls(
            id=row.id,
            seq=row.seq,
            role=row.role,
            content=row.content,
            model=row.model,
            status=row.status,
            error=row.error,
            prompt_tokens=row.prompt_tokens,
            completion_tokens=row.completion_tokens,
            created_at=row.created_at,
        )


class ConversationPage(BaseModel):
    """One page of conversations, newest first."""

    data: list[ConversationView]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null: end.")


class ConversationDetail(ConversationView):
    """A conversation with one page of its messages, oldest first."""

    messages: list[MessageView]
    next_cursor: str | None = Field(description="Pass as `cursor` for more messages; null: end.")


class ConversationCreate(_Body):
    """A new conversation; the title defaults to the first message sent to it."""

    title: Title | None = None
    model: ModelName | None = None


class ConversationUpdate(_Body):
    """Fields to change; absent fields stay."""

    title: Title | None = None
    archived: StrictBool | None = None  # 0 or "yes" is an error, not a silent change


class ImportMessage(_Body):
    """One message of an exported conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text
    model: ModelName | None = None
    status: Literal["complete", "streaming", "incomplete", "error", "interrupted"] = "complete"
    # Bounded to what an INTEGER column holds on every database (an unbounded int was a 500).
    # Whole numbers only: "12" or 12.5 is an error in a document that claims to be an export.
    prompt_tokens: TokenCount | None = None
    completion_tokens: TokenCount | None = None


class ImportConversation(BaseModel):
    """The conversation part of an export."""

    model_config = ConfigDict(extra="ignore")

    title: Title = ""
    model: ModelName | None = None
    archived: StrictBool = False


class ConversationImport(BaseModel):
    """A document made by the JSON export."""

    model_config = ConfigDict(extra="ignore")

    version: Literal[1]
    conversation: ImportConversation
    messages: Annotated[list[ImportMessage], Field(max_length=10_000)]
