"""POST /api/chat (seed 003's chat API, with the conversation kept in the database)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from gateway.chat import service
from gateway.chat.deps import ChatDep
from gateway.chat.schemas import ChatRequest
from gateway.deps import PrincipalDep
from gateway.errors import GatewayError
from gateway.proxy.deps import SchedulerDep
from gateway.routing import GuardedRoute

router = APIRouter(tags=["chat"], route_class=GuardedRoute)

_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The reply: OpenAI chat.completion JSON, or chat.completion.chunk "
        "server-sent events when stream is true. X-Conversation-Id and X-Message-Id name "
        "the conversation and the assistant message.",
        "content": {"text/event-stream": {}},
    },
    400: {"description": "Invalid request (the error names the field)"},
    404: {"description": "No such conversation of yours"},
    409: {"description": "A reply is still being written / the key's request is in progress"},
    422: {"description": "The Idempotency-Key was used for a different request"},
    503: {"description": "Database or engine unavailable (nothing was sent to the engine)"},
}


@router.post("/api/chat", responses=_RESPONSES)
@router.post(
    "/api/chat/completions",
    responses=_RESPONSES,
    summary="Chat (OpenAI SDK form)",
    description="The same as POST /api/chat, at the path the OpenAI SDKs call when their "
    "base URL is `.../api`: pass `conversation_id` in `extra_body` and send only the new "
    "message(s); the stored history is added by the gateway.",
)
async def chat(
    body: ChatRequest,
    request: Request,
    state: ChatDep,
    scheduler: SchedulerDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description="Retrying with the same key returns the first answer, saves nothing twice.",
            # Documented only; checked below with a clearer message than a validation error.
            json_schema_extra={"minLength": 1, "maxLength": 255, "pattern": "^[ -~]+$"},
        ),
    ] = None,
) -> Response:
    """Send a message to a conversation and get the reply (streamed or whole); both are saved."""
    if idempotency_key is not None and not (
        0 < len(idempotency_key) <= 255 and idempotency_key.isprintable()
    ):
        raise GatewayError(
            400,
            "'Idempotency-Key' must be 1 to 255 printable characters.",
            param="Idempotency-Key",
        )
    return await service.chat(
        state=state,
        scheduler=scheduler,
        request=request,
        principal=principal,
        body=body,
        idempotency_key=idempotency_key,
    )
