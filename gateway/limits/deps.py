"""The limiters as a route dependency."""

from __future__ import annotations

from typing import Annotated, Protocol, cast

from fastapi import Depends, Request

from gateway.limits.factory import Limiters


class LimitResources(Protocol):
    """What the limits read of the app's resources."""

    @property
    def limiters(self) -> Limiters:
        """The inference and strict limiters."""
        ...


async def get_limiters(request: Request) -> Limiters:
    """The app's limiters."""
    return cast(LimitResources, request.app.state.resources).limiters


LimitersDep = Annotated[Limiters, Depends(get_limiters)]
