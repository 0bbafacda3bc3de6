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
to the engine as if the model had said them. Then the newest messages are kept while they fit
the model's context minus the reply's reserve (`max_tokens`, else CHAT_RESERVED_REPLY_TOKENS,
at most a quarter of the context), counting CHAT_BYTES_PER_TOKEN UTF-8 bytes per token plus 4
per message; system messages are always kept. A new message that cannot fit alone is a 400.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import Request
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.responses import Response

from gateway.auth.principal import Principal
from gateway.chat.relay import ChatRelay, ReplyRecorder
from gateway.chat.schemas import ChatRequest
from gateway.conversations import service as conversations
from gateway.conversations.models import ChatIdempotency, Conversation, Message, MessageStatus
from gateway.db import utcnow
from gateway.errors import GatewayError
from gateway.logging import get_logger
from gateway.proxy.scheduler import CURRENT, Scheduler
from gateway.proxy.service import (
    Admission,
    admit,
    check_model_scope,
    limits_from,
    relay_checked,
)
from gateway.proxy.upstream import Outcome
from gateway.proxy.validation import ProxyRequest, Route, parse_request
from gateway.responses import JSONResponse
from gateway.state import AppState

log = get_logger(__name__)

MESSAGE_OVERHEAD_TOKENS = 4
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
        if body.message is None or not body.message.strip():
            raise _bad("'edit' needs the new text in 'message'.", "message")
        return [{"role": "user", "content": body.message}]
    if body.messages is not None:
        added = [{"role": m.role, "content": m.content} for m in body.messages]
    elif body.message is not None:
        added = [{"role": "user", "content": body.message}]
    else:
        raise _bad("Send a 'message' (or 'messages').", "message")
    last = added[-1]
    if last["role"] != "user" or not last["content"].strip():
        raise _bad("The last message must be a non-empty user message.", "messages")
    return added


def _check_sampling(body: ChatRequest, state: AppState) -> None:
    """The proxy's own checks of sampling parameters (400 naming the field)."""
    probe = {"messages": [{"role": "user", "content": "."}], **body.sampling()}
    parse_request(Route.CHAT, orjson.dumps(probe), limits_from(state.settings))


def request_hash(body: ChatRequest) -> str:
    """A digest of the request, to tell a retry from a different request with a reused key."""
    dumped = orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(dumped).hexdigest()


def context_window(state: AppState, model: str | None) -> int:
    """The context length of the model that will answer (its profile's, else the default)."""
    control = state.models
    status = control.status()
    profile_id = status.profile_id
    if model and model != CURRENT and model not in status.served_names:
        profile_id = next(
            (pid for pid in control.verdicts() if model in control.profile(pid).served_names),
            None,
        )
    if profile_id is None:
        return state.settings.CHAT_DEFAULT_CONTEXT
    verdict = control.verdicts().get(profile_id)
    if verdict is not None and verdict.max_model_len:
        return verdict.max_model_len
    try:
        length = control.profile(profile_id).max_model_len
    except KeyError:
        length = None
    return length or state.settings.CHAT_DEFAULT_CONTEXT


def trim_history(
    messages: Sequence[dict[str, str]],
    *,
    context_tokens: int,
    reply_tokens: int | None,
    default_reserve: int,
    bytes_per_token: float,
) -> list[dict[str, str]]:
    """The newest messages that fit the context (system messages always kept); see module doc."""
    reserve = (
        reply_tokens if reply_tokens is not None else min(default_reserve, context_tokens // 4)
    )
    budget = context_tokens - reserve
    if budget <= 0:
        raise _bad(
            f"'max_tokens' ({reserve}) leaves no room for the conversation in the model's "
            f"context of {context_tokens} tokens.",
            "max_tokens",
            "context_length_exceeded",
        )

    def cost(message: dict[str, str]) -> int:
        size = len(message["content"].encode())
        return math.ceil(size / bytes_per_token) + MESSAGE_OVERHEAD_TOKENS

    system = [m for m in messages if m["role"] == "system"]
    rest = [m for m in messages if m["role"] != "system"]
    used = sum(cost(m) for m in system)
    kept: list[dict[str, str]] = []
    for message in reversed(rest):
        needed = cost(message)
        if used + needed > budget:
            break
        kept.append(message)
        used += needed
    if rest and not kept:
        raise _bad(
            f"The message is too long for the model's context of {context_tokens} tokens "
            f"(with {reserve} kept for the reply).",
            "message",
            "context_length_exceeded",
        )
    return system + kept[::-1]


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
        await session.execute(delete(Message).where(Message.id.in_([m.id for m in replies])))
    if body.action == "edit" and new_text is not None:
        last_user.content = new_text
        last_user.updated_at = utcnow()


async def _prepare(
    session: AsyncSession,
    *,
    state: AppState,
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
        writer=conversations.WRITER,
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
    return Prepared(conversation.id, assistant.id, history)


# -- the endpoint ------------------------------------------------------------------------------


async def chat(
    *,
    state: AppState,
    scheduler: Scheduler,
    request: Request,
    principal: Principal,
    body: ChatRequest,
    idempotency_key: str | None,
) -> Response:
    """Save, relay and record one chat turn (see the module doc for the order of work)."""
    user_id = conversations.require_user(principal)
    added = new_messages(body)
    _check_sampling(body, state)
    check_model_scope(principal, body.model, state)
    request.state.model = body.model
    if idempotency_key is not None:
        replay = await _replay(state, user_id, idempotency_key, body)
        if replay is not None:
            return replay
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
        replay = await _replay(state, user_id, idempotency_key, body)
        if replay is None:
            raise
        return replay
    return await _relay(
        state=state,
        scheduler=scheduler,
        request=request,
        principal=principal,
        body=body,
        prepared=prepared,
        admission=admission,
    )


async def _relay(
    *,
    state: AppState,
    scheduler: Scheduler,
    request: Request,
    principal: Principal,
    body: ChatRequest,
    prepared: Prepared,
    admission: Admission,
) -> Response:
    upstream: dict[str, Any] = {"messages": prepared.history, "stream": body.stream}
    if body.model:
        upstream["model"] = body.model
    upstream.update(body.sampling())
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


async def _mark_failed(state: AppState, prepared: Prepared, error: str) -> None:
    outcome_recorder = ReplyRecorder(
        factory=state.session_factory,
        conversation_id=prepared.conversation_id,
        message_id=prepared.assistant_id,
        stream=False,
        save_interval_s=state.settings.CHAT_SAVE_INTERVAL_S,
    )
    outcome_recorder.whole_body = orjson.dumps({"error": {"message": error}})
    await outcome_recorder.finish(Outcome(status=503, error=error), model=None)


# -- idempotent replays ------------------------------------------------------------------------


async def _replay(
    state: AppState, user_id: uuid.UUID, key: str, body: ChatRequest
) -> Response | None:
    """The answer of an earlier request with this key, or None when there was none."""
    async with conversations.database_errors(), state.session_factory() as session:
        found = await session.get(ChatIdempotency, (user_id, key))
        if found is None:
            return None
        if found.request_hash != request_hash(body):
            raise GatewayError(
                422,
                "This Idempotency-Key was used for a different request.",
                code="idempotency_key_reused",
                param="Idempotency-Key",
            )
        message = (
            await session.execute(select(Message).where(Message.id == found.assistant_message_id))
        ).scalar_one_or_none()
    if message is None:
        raise GatewayError(
            409,
            "The reply of the request with this Idempotency-Key was replaced since.",
            code="idempotency_reply_replaced",
        )
    headers = {
        "X-Conversation-Id": str(found.conversation_id),
        "X-Message-Id": str(message.id),
        "Idempotent-Replayed": "true",
    }
    if message.status == MessageStatus.STREAMING.value:
        raise GatewayError(
            409,
            "The request with this Idempotency-Key is still being answered.",
            code="request_in_progress",
            headers={**headers, "Retry-After": "1"},
        )
    if message.status == MessageStatus.ERROR.value:
        raise GatewayError(
            502,
            f"The request with this Idempotency-Key failed: {message.error}",
            code="original_request_failed",
            headers=headers,
        )
    return _replay_response(message, body.stream, headers)


def _replay_response(message: Message, stream: bool, headers: dict[str, str]) -> Response:
    complete = message.status == MessageStatus.COMPLETE.value
    base = {
        "id": f"chatcmpl-{message.id.hex}",
        "created": int(message.created_at.timestamp()),
        "model": message.model or "",
    }
    if not stream:
        usage = {
            "prompt_tokens": message.prompt_tokens or 0,
            "completion_tokens": message.completion_tokens or 0,
            "total_tokens": (message.prompt_tokens or 0) + (message.completion_tokens or 0),
        }
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": message.content},
            "finish_reason": "stop" if complete else None,
        }
        payload = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
        return JSONResponse(payload, headers=headers)
    chunk = {**base, "object": "chat.completion.chunk"}
    events = [
        {
            **chunk,
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": message.content},
                    "finish_reason": None,
                }
            ],
        }
    ]
    if complete:
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    else:
        events.append(
            {
                "error": {
                    "message": f"The original reply is {message.status}: {message.error}",
                    "type": "service_unavailable_error",
                    "code": "reply_incomplete",
                }
            }
        )
    body = b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events)
    if complete:
        body += b"data: [DONE]\n\n"
    return Response(
        body, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
    )
