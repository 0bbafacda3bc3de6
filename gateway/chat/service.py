"""POST /api/chat: save the user's message, send the history upstream, save the reply.

Order of work, so nothing the user sees is unsaved or unbilled:
1. check the body, the model scope and the caller's request limits (nothing saved on a 4xx);
2. in one transaction: the conversation (new, or the caller's under its row lock), the user
   message(s), an assistant placeholder (`streaming`) and the Idempotency-Key; the history is
   built and trimmed in the same transaction — commit, or 503 before any engine call;
3. admit (local, cloud or queue) and relay exactly like /v1/chat/completions;
4. the reply is saved as the client received it (see gateway.chat.relay).

History rule: only `complete` messages go upstream, in order. Replies that were cut short
(`incomplete`, `error`, `interrupted`) stay visible in the conversation but are never sent
to the engine as if the model had said them; gateway.chat.history trims them to the model's
context. Idempotent retries: gateway.chat.replay.
"""

from __future__ import annotations

import asyncio
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from gateway.chat.deps import ChatResources
from gateway.chat.history import context_window, trim_history
from gateway.chat.relay import ChatRelay, ReplyRecorder
from gateway.chat.replay import replay_earlier, request_hash
from gateway.chat.schemas import CHAT_OWNED_FIELDS, ChatRequest
from gateway.conversations import service as conversations
from gateway.conversations.models import ChatIdempotency, Conversation, Message, MessageStatus
from gateway.db import utcnow
from gateway.errors import GatewayError
from gateway.logging import get_logger
from gateway.principal import Principal
from gateway.proxy.scheduler import CURRENT, Scheduler
from gateway.proxy.service import (
    Admission,
    admit,
    check_model_scope,
    field_grants,
    limits_from,
    relay_checked,
)
from gateway.proxy.upstream import Outcome
from gateway.proxy.validation import ProxyRequest, Route, parse_request
from gateway.text import is_blank

log = get_logger(__name__)

ENDPOINT = "api_chat"
# One writer per conversation in this process (SQLite has no row locks; Postgres also locks
# the conversation row, for several processes).
_conversation_locks: weakref.WeakValueDictionary[uuid.UUID, asyncio.Lock] = (
    weakref.WeakValueDictionary()
)


def _lock_for(conversation_id: uuid.UUID) -> asyncio.Lock:
    lock = _conversation_locks.get(conversation_id)
    if lock is None:
        lock = asyncio.Lock()
        _conversation_locks[conversation_id] = lock
    return lock


@dataclass(frozen=True)
class Prepared:
    """What the transaction saved and what goes upstream."""

    conversation_id: uuid.UUID
    assistant_id: uuid.UUID
    history: list[dict[str, str]]
    idempotent: bool = False  # saved with an Idempotency-Key: keep what a replay sends again


# -- checks ------------------------------------------------------------------------------------


def _bad(message: str, param: str | None, code: str = "invalid_request") -> GatewayError:
    return GatewayError(400, message, code=code, param=param)


def new_messages(body: ChatRequest) -> list[dict[str, str]]:
    """The messages this request adds, checked against its action."""
    if body.action == "regenerate":
        if body.message is not None or body.messages is not None:
            raise _bad("'regenerate' takes no message: it answers the last one again.", "message")
        if body.conversation_id is None:
            raise _bad("'regenerate' needs a 'conversation_id'.", "conversation_id")
        return []
    if body.message is not None and body.messages is not None:
        raise _bad("Send either 'message' or 'messages', not both.", "messages")
    if body.action == "edit":
        if body.conversation_id is None:
            raise _bad("'edit' needs a 'conversation_id'.", "conversation_id")
        if body.message is None:
            raise _bad("'edit' needs the new text in 'message'.", "message")
        return [{"role": "user", "content": body.message}]
    if body.messages is not None:
        added = [{"role": m.role, "content": m.content} for m in body.messages]
    elif body.message is not None:
        added = [{"role": "user", "content": body.message}]
    else:
        raise _bad("Send a 'message' (or 'messages').", "message")
    last = added[-1]
    if last["role"] != "user" or is_blank(last["content"]):
        # The one rule here that the OpenAPI document cannot state (JSON Schema has no "last
        # item"), hence a code of its own.
        raise _bad(
            "The last message must be a non-empty user message.",
            "messages",
            "invalid_last_message",
        )
    return added


def _check_engine_fields(
    body: ChatRequest, state: ChatResources, principal: Principal
) -> dict[str, Any]:
    """The proxy's own checks of the sampling parameters and of the other engine fields (the
    same field policy as /v1/*; 400 naming the field); the extra fields to send, as checked."""
    extras = body.model_extra or {}
    for name, value in extras.items():
        if name in CHAT_OWNED_FIELDS:
            raise _bad(
                f"'{name}' is not accepted on /api/chat: it keeps one reply per turn and asks "
                "the engine for usage itself (send it to /v1/chat/completions).",
                name,
                "forbidden_field",
            )
        try:
            orjson.dumps(value)
        except orjson.JSONEncodeError as exc:
            # An integer beyond 64 bits or nesting past orjson's limit: no engine body holds it.
            raise _bad(f"'{name}' cannot be sent to the engine: {exc}.", name) from None
    probe = {"messages": [{"role": "user", "content": "."}], **body.sampling(), **extras}
    checked = parse_request(
        Route.CHAT,
        orjson.dumps(probe),
        limits_from(state.settings),
        field_grants(principal, state.settings),
    )
    return {name: checked.body[name] for name in extras}


# -- the transaction ---------------------------------------------------------------------------


async def _conversation(
    session: AsyncSession, *, principal: Principal, body: ChatRequest, added: list[dict[str, str]]
) -> Conversation:
    user_id = conversations.require_user(principal)
    if body.conversation_id is None:
        first_user = next((m["content"] for m in added if m["role"] == "user"), "")
        conversation = Conversation(
            user_id=user_id,
            title=conversations.make_title(first_user),
            model=body.model,
            archived=False,
        )
        session.add(conversation)
        await session.flush()
        return conversation
    return await conversations.get_owned(
        session, principal=principal, conversation_id=body.conversation_id, lock=True
    )


async def _apply_action(
    session: AsyncSession, conversation: Conversation, body: ChatRequest, new_text: str | None
) -> None:
    """Regenerate / edit: drop the reply (and for edit, change the user message) they replace."""
    if body.action == "send":
        return
    rows = await conversations.all_messages(session, conversation_id=conversation.id)
    last_user = next((m for m in reversed(rows) if m.role == "user"), None)
    if last_user is None:
        raise GatewayError(
            409, "There is no user message to answer again.", code="nothing_to_regenerate"
        )
    replies = [m for m in rows if m.seq > last_user.seq]
    if any(m.status == MessageStatus.STREAMING.value for m in replies):
        raise GatewayError(
            409, "The last reply is still being written; stop it first.", code="reply_in_progress"
        )
    if replies:
        replaced = [m.id for m in replies]
        # The keys of the requests that made these replies would go with them (the foreign key
        # cascades), and a retry would then be answered as a new request: a second conversation.
        # They point at the user message instead, which stays; replay reads that as "replaced".
        await session.execute(
            update(ChatIdempotency)
            .where(ChatIdempotency.assistant_message_id.in_(replaced))
            .values(assistant_message_id=last_user.id)
        )
        await session.execute(delete(Message).where(Message.id.in_(replaced)))
    if body.action == "edit" and new_text is not None:
        last_user.content = new_text
        last_user.updated_at = utcnow()


async def _prepare(
    session: AsyncSession,
    *,
    state: ChatResources,
    principal: Principal,
    body: ChatRequest,
    added: list[dict[str, str]],
    model_label: str | None,
    idempotency_key: str | None,
) -> Prepared:
    settings = state.settings
    conversation = await _conversation(session, principal=principal, body=body, added=added)
    if body.action == "edit":
        await _apply_action(session, conversation, body, added[0]["content"])
        added = []
    else:
        await _apply_action(session, conversation, body, None)
    seq = await conversations.next_seq(session, conversation.id)
    for message in added:
        session.add(
            Message(
                conversation_id=conversation.id,
                seq=seq,
                role=message["role"],
                content=message["content"],
                status=MessageStatus.COMPLETE.value,
            )
        )
        seq += 1
    await session.flush()
    rows = await conversations.all_messages(session, conversation_id=conversation.id)
    history = [
        {"role": m.role, "content": m.content}
        for m in rows
        if m.status == MessageStatus.COMPLETE.value
    ]
    history = trim_history(
        history,
        context_tokens=context_window(state, body.model),
        reply_tokens=body.max_tokens,
        default_reserve=settings.CHAT_RESERVED_REPLY_TOKENS,
        bytes_per_token=settings.CHAT_BYTES_PER_TOKEN,
    )
    assistant = Message(
        conversation_id=conversation.id,
        seq=seq,
        role="assistant",
        content="",
        model=model_label,
        status=MessageStatus.STREAMING.value,
        writer=conversations.writer_id(),
    )
    session.add(assistant)
    conversation.updated_at = utcnow()
    if body.model:
        conversation.model = body.model
    await session.flush()
    if idempotency_key is not None:
        session.add(
            ChatIdempotency(
                user_id=conversation.user_id,
                key=idempotency_key,
                request_hash=request_hash(body),
                conversation_id=conversation.id,
                assistant_message_id=assistant.id,
            )
        )
        await session.flush()
    await session.commit()
    return Prepared(conversation.id, assistant.id, history, idempotency_key is not None)


# -- the endpoint ------------------------------------------------------------------------------


async def chat(
    *,
    state: ChatResources,
    scheduler: Scheduler,
    request: Request,
    principal: Principal,
    body: ChatRequest,
    idempotency_key: str | None,
) -> Response:
    """Save, relay and record one chat turn (see the module doc for the order of work)."""
    user_id = conversations.require_user(principal)
    added = new_messages(body)
    extras = _check_engine_fields(body, state, principal)
    request.state.model = scheduler.shown_model(body.model)
    check_model_scope(principal, body.model, state)
    # An unknown model is refused before anything is saved (its name is no conversation's).
    scheduler.check_model(body.model)
    if idempotency_key is not None:
        earlier = await replay_earlier(state, user_id, idempotency_key, body)
        if earlier is not None:
            return earlier
    admission = await admit(state=state, principal=principal, request=request)
    status = state.manager.status()
    model_label = body.model if body.model and body.model != CURRENT else status.served_model_name
    lock_id = body.conversation_id or uuid.uuid4()
    try:
        async with (
            conversations.database_errors(),
            _lock_for(lock_id),
            state.session_factory() as session,
        ):
            prepared = await _prepare(
                session,
                state=state,
                principal=principal,
                body=body,
                added=added,
                model_label=model_label,
                idempotency_key=idempotency_key,
            )
    except IntegrityError:
        # The same Idempotency-Key raced in from another request: answer as its retry.
        if idempotency_key is None:
            raise
        earlier = await replay_earlier(state, user_id, idempotency_key, body)
        if earlier is None:
            raise
        return earlier
    return await _relay(
        state=state,
        scheduler=scheduler,
        request=request,
        principal=principal,
        body=body,
        extras=extras,
        prepared=prepared,
        admission=admission,
    )


async def _relay(
    *,
    state: ChatResources,
    scheduler: Scheduler,
    request: Request,
    principal: Principal,
    body: ChatRequest,
    extras: dict[str, Any],
    prepared: Prepared,
    admission: Admission,
) -> Response:
    upstream: dict[str, Any] = {"messages": prepared.history, "stream": body.stream}
    if body.model:
        upstream["model"] = body.model
    upstream.update(body.sampling())
    upstream.update(extras)
    checked = ProxyRequest(
        route=Route.CHAT,
        body=upstream,
        model=body.model,
        stream=body.stream,
        client_wants_usage=False,
    )
    recorder = ReplyRecorder(
        factory=state.session_factory,
        conversation_id=prepared.conversation_id,
        message_id=prepared.assistant_id,
        stream=body.stream,
        save_interval_s=state.settings.CHAT_SAVE_INTERVAL_S,
        idempotent=prepared.idempotent,
    )
    ids = {
        "X-Conversation-Id": str(prepared.conversation_id),
        "X-Message-Id": str(prepared.assistant_id),
    }
    target_model: list[str] = []

    def model_of_target() -> str | None:
        return target_model[0] if target_model else None

    def factory(**kwargs: Any) -> ChatRelay:
        target_model.append(kwargs["target"].model)
        return ChatRelay(recorder=recorder, model_of_target=model_of_target, **kwargs)

    try:
        return await relay_checked(
            state=state,
            scheduler=scheduler,
            checked=checked,
            request=request,
            principal=principal,
            admission=Admission(
                admission.limit_key, admission.token_rules, {**admission.headers, **ids}
            ),
            endpoint=ENDPOINT,
            response_factory=factory,
        )
    except GatewayError as exc:
        # Queue timeout, client gone while queued...: the placeholder says why, then the error.
        await _mark_failed(state, prepared, exc.message)
        exc.headers = {**(exc.headers or {}), **ids}
        raise


async def _mark_failed(state: ChatResources, prepared: Prepared, error: str) -> None:
    outcome_recorder = ReplyRecorder(
        factory=state.session_factory,
        conversation_id=prepared.conversation_id,
        message_id=prepared.assistant_id,
        stream=False,
        save_interval_s=state.settings.CHAT_SAVE_INTERVAL_S,
    )
    outcome_recorder.whole_body = orjson.dumps({"error": {"message": error}})
    await outcome_recorder.finish(Outcome(status=503, error=error), model=None)
