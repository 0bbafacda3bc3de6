"""What the chat API reads of the app's resources: the proxy's, and database sessions."""

from __future__ import annotations

from typing import Annotated, Protocol, cast

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.proxy.deps import ProxyResources


class ChatResources(ProxyResources, Protocol):
    """The proxy's resources plus the database (conversations are saved as they stream)."""

    @property
    def session_factory(self) -> async_sessionmaker[AsyncSession]:
        """Opens database sessions."""
        ...


async def get_chat(request: Request) -> ChatResources:
    """The chat API's resources."""
    return cast(ChatResources, request.app.state.resources)


ChatDep = Annotated[ChatResources, Depends(get_chat)]
