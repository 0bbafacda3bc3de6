"""Idempotent retries of /api/chat: the answer of the first request with a key, replayed.

A replay is the same response: a whole reply's JSON body is sent again byte for byte (kept in
`chat_idempotency.response` when the reply was saved); a stream is sent again as one content
chunk and its finish, carrying the first stream's id, created, model and finish_reason. Keys
saved before that column existed replay a response rebuilt from the stored message.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any

import orjson
from sqlalchemy import select
from starlette.responses import Response

from gateway.chat.deps import ChatResources
from gateway.chat.schemas import ChatRequest
from gateway.conversations import service as conversations
from gateway.conversations.models import ChatIdempotency, Message, MessageStatus
from gateway.errors import GatewayError
from gateway.responses import JSONResponse


def request_hash(body: ChatRequest) -> str:
    """A digest of the request, to tell a retry from a different request with a reused key."""
    dumped = orjson.dumps(body.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(dumped).hexdigest()


async def replay_earlier(
    state: ChatResources, user_id: uuid.UUID, key: str, body: ChatRequest
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
    # A regenerated or edited reply is deleted and its key repointed at the user message it
    # answered (gateway.chat.service._apply_action); None only if a row was removed otherwise.
    if message is None or message.role != "assistant":
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
    return replay_response(message, body.stream, headers, found.response)


def _saved_envelope(original: str | None) -> dict[str, Any]:
    """The first stream's shared fields and finish_reason, as ReplyRecorder kept them."""
    if original is None:
        return {}
    try:
        saved = orjson.loads(original)
    except orjson.JSONDecodeError:
        return {}
    return saved if isinstance(saved, dict) else {}


def replay_response(
    message: Message, stream: bool, headers: dict[str, str], original: str | None = None
) -> Response:
    """The response of the first request with a key, sent again (see the module doc)."""
    complete = message.status == MessageStatus.COMPLETE.value
    if not stream and complete and original is not None:
        return Response(original.encode(), media_type="application/json", headers=headers)
    saved = _saved_envelope(original) if stream else {}
    base: dict[str, Any] = {
        "id": f"chatcmpl-{message.id.hex}",
        "created": int(message.created_at.timestamp()),
        "model": message.model or "",
    }
    base.update({name: value for name, value in saved.items() if name != "finish_reason"})
    finish_reason = (saved.get("finish_reason") or "stop") if complete else None
    if not stream:
        usage = {
            "prompt_tokens": message.prompt_tokens or 0,
            "completion_tokens": message.completion_tokens or 0,
            "total_tokens": (message.prompt_tokens or 0) + (message.completion_tokens or 0),
        }
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": message.content},
            "finish_reason": finish_reason,
        }
        payload = {**base, "object": "chat.completion", "choices": [choice], "usage": usage}
        return JSONResponse(payload, headers=headers)
    chunk = {"object": "chat.completion.chunk", **base}
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
        events.append(
            {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason}]}
        )
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
