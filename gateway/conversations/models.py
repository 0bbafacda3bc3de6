"""The conversations, messages and chat idempotency tables."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db import Base, TimestampMixin, UtcDateTime, new_id, utcnow


class MessageStatus(StrEnum):
    """Where a message stands; only `complete` replies go back upstream as history."""

    COMPLETE = "complete"
    STREAMING = "streaming"  # the reply is being written now
    INCOMPLETE = "incomplete"  # cut short (client left, engine died): holds what was delivered
    ERROR = "error"  # the engine or the gateway refused; content is what was delivered (often "")
    INTERRUPTED = "interrupted"  # the gateway stopped while streaming (found at startup)


class Conversation(TimestampMixin, Base):
    """One conversation of one user; `updated_at` moves with every new message."""

    __tablename__ = "conversations"
    __table_args__ = (
        # "My latest conversations": owner, newest first, id as the tie-breaker of the cursor.
        Index("ix_conversations_user_updated", "user_id", "updated_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(256), default=None)
    archived: Mapped[bool] = mapped_column(Boolean, default=False)


class Message(TimestampMixin, Base):
    """One message; `seq` orders a conversation (assigned under the conversation's row lock)."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "seq", name="uq_messages_conversation_seq"),
        CheckConstraint("role IN ('system', 'user', 'assistant')", name="role_known"),
        CheckConstraint(
            "status IN ('complete', 'streaming', 'incomplete', 'error', 'interrupted')",
            name="status_known",
        ),
        # The crash sweep finds rows left streaming without reading every message.
        Index("ix_messages_status_updated", "status", "updated_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str | None] = mapped_column(String(256), default=None)
    status: Mapped[str] = mapped_column(String(16), default=MessageStatus.COMPLETE.value)
    error: Mapped[str | None] = mapped_column(String(500), default=None)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, default=None)
    # host:pid:nonce of the process writing a streaming reply (the crash sweep checks it is
    # alive; the per-process nonce tells a restarted process that got the same pid apart).
    writer: Mapped[str | None] = mapped_column(String(300), default=None)


class ChatIdempotency(Base):
    """One `Idempotency-Key` of one user: the request it answered and the messages it made."""

    __tablename__ = "chat_idempotency"

    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    conversation_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    # The reply the request made; once that reply is regenerated or edited away, the user
    # message it answered (the key must outlive the reply, see gateway.chat.replay).
    assistant_message_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("messages.id", ondelete="CASCADE")
    )
    # What a retry sends again (gateway.chat.replay): the JSON body of a whole reply as the
    # client received it, or, for a stream, the fields its chunks shared (id, created, model...)
    # and its finish_reason. None until the reply is saved (and for keys of older versions).
    response: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
