"""/api/conversations: list, create, read, rename/archive, delete, export and import."""

from __future__ import annotations

import re
import uuid
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Response, status

from gateway.conversations import service
from gateway.conversations.schemas import (
    ConversationCreate,
    ConversationDetail,
    ConversationImport,
    ConversationPage,
    ConversationUpdate,
    ConversationView,
    MessageView,
)
from gateway.deps import PrincipalDep, SessionDep, SettingsDep
from gateway.routing import BodyLimit, GuardedRoute, body_limit
from gateway.text import NoNul

router = APIRouter(prefix="/api/conversations", tags=["conversations"], route_class=GuardedRoute)
# Ids are matched as UUIDs in the path itself, so /api/conversations/import is never taken for
# an id (PATCH there is a 405, not "invalid id"), and anything that is not a UUID is a 404.

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "No such conversation of yours"}
}
Limit = Annotated[int, Query(ge=1, le=service.MAX_PAGE)]
ConversationCursor = Annotated[
    str | None,
    Query(
        pattern=service.CONVERSATION_CURSOR_PATTERN,
        description="`next_cursor` of the previous page: the conversations after it.",
    ),
]
MessageCursor = Annotated[
    str | None,
    Query(
        pattern=service.MESSAGE_CURSOR_PATTERN,
        description="`next_cursor` of the previous page: the messages after it.",
    ),
]


@router.get("", response_model=ConversationPage)
async def list_conversations(
    principal: PrincipalDep,
    session: SessionDep,
    limit: Limit = 20,
    cursor: ConversationCursor = None,
    # No title holds a NUL (they are refused), and Postgres refuses one in a query too.
    q: Annotated[str | None, Query(max_length=200, description="Title contains"), NoNul] = None,
    archived: bool = False,
) -> ConversationPage:
    """Your conversations, most recently updated first."""
    user_id = service.require_user(principal)
    page = await service.list_conversations(
        session, user_id=user_id, limit=limit, cursor=cursor, query=q, archived=archived
    )
    return ConversationPage(
        data=[ConversationView.of(row) for row in page.items], next_cursor=page.next_cursor
    )


@router.post("", response_model=ConversationView, status_code=status.HTTP_201_CREATED)
async def create_conversation(
    body: ConversationCreate, principal: PrincipalDep, session: SessionDep
) -> ConversationView:
    """Start an empty conversation."""
    user_id = service.require_user(principal)
    row = await service.create_conversation(
        session, user_id=user_id, title=body.title, model=body.model
    )
    return ConversationView.of(row)


@router.post("/import", response_model=ConversationView, status_code=status.HTTP_201_CREATED)
@body_limit(BodyLimit.IMPORT)
async def import_conversation(
    body: ConversationImport, principal: PrincipalDep, session: SessionDep
) -> ConversationView:
    """Make a new conversation of yours from a JSON export."""
    user_id = service.require_user(principal)
    row = await service.import_conversation(
        session,
        user_id=user_id,
        title=body.conversation.title,
        model=body.conversation.model,
        archived=body.conversation.archived,
        messages=[
            service.ImportedMessage(
                role=m.role,
                content=m.content,
                model=m.model,
                status=m.status,
                prompt_tokens=m.prompt_tokens,
                completion_tokens=m.completion_tokens,
            )
            for m in body.messages
        ],
    )
    return ConversationView.of(row)


@router.get("/{conversation_id:uuid}", response_model=ConversationDetail, responses=_NOT_FOUND)
async def get_conversation(
    conversation_id: uuid.UUID,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: MessageCursor = None,
) -> ConversationDetail:
    """One conversation with its messages, oldest first (paginated)."""
    row = await service.get_owned(
        session,
        principal=principal,
        conversation_id=conversation_id,
        admin_may_read=settings.ADMIN_CAN_READ_CONVERSATIONS,
    )
    page = await service.messages_page(session, conversation_id=row.id, limit=limit, cursor=cursor)
    view = ConversationView.of(row)
    return ConversationDetail(
        **view.model_dump(),
        messages=[MessageView.of(message) for message in page.items],
        next_cursor=page.next_cursor,
    )


@router.patch("/{conversation_id:uuid}", response_model=ConversationView, responses=_NOT_FOUND)
async def update_conversation(
    conversation_id: uuid.UUID,
    body: ConversationUpdate,
    principal: PrincipalDep,
    session: SessionDep,
) -> ConversationView:
    """Rename or (un)archive a conversation of yours."""
    row = await service.get_owned(session, principal=principal, conversation_id=conversation_id)
    row = await service.update_conversation(
        session, conversation=row, title=body.title, archived=body.archived
    )
    return ConversationView.of(row)


@router.delete(
    "/{conversation_id:uuid}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND
)
async def delete_conversation(
    conversation_id: uuid.UUID, principal: PrincipalDep, session: SessionDep
) -> Response:
    """Delete a conversation of yours and its messages."""
    row = await service.get_owned(session, principal=principal, conversation_id=conversation_id)
    await service.delete_conversation(session, conversation=row)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{conversation_id:uuid}/export",
    responses={
        **_NOT_FOUND,
        200: {"content": {"application/json": {}, "text/markdown": {}}},
    },
)
async def export_conversation(
    conversation_id: uuid.UUID,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    format: Literal["json", "markdown"] = "json",
) -> Response:
    """The whole conversation as a JSON document (importable) or as Markdown."""
    row = await service.get_owned(
        session,
        principal=principal,
        conversation_id=conversation_id,
        admin_may_read=settings.ADMIN_CAN_READ_CONVERSATIONS,
    )
    messages = await service.all_messages(session, conversation_id=row.id)
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", row.title).strip("-")[:60] or "conversation"
    if format == "markdown":
        content = service.export_markdown(row, messages).encode()
        media_type, suffix = "text/markdown; charset=utf-8", "md"
    else:
        content = orjson.dumps(service.export_json(row, messages), option=orjson.OPT_INDENT_2)
        media_type, suffix = "application/json", "json"
    return Response(
        content,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{stem}.{suffix}"'},
    )
