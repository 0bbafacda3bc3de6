"""Usage statistics: everyone's for admins (seed: GET /admin/api/usage?days=7), your own for you."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from gateway.deps import AdminDep, PrincipalDep, SessionDep
from gateway.usage import service
from gateway.usage.schemas import UsageReport

router = APIRouter(tags=["usage"])

DaysQuery = Annotated[
    int,
    Query(
        ge=service.MIN_DAYS,
        le=service.MAX_DAYS,
        description="UTC days to cover, today included.",
    ),
]


@router.get("/admin/api/usage", response_model=UsageReport)
async def admin_usage(_: AdminDep, session: SessionDep, days: DaysQuery = 7) -> UsageReport:
    """Requests, tokens, errors, cloud overflow and latency per day, user, key and model."""
    return await service.usage_report(session, days=days)


@router.get("/api/usage", response_model=UsageReport)
async def my_usage(
    principal: PrincipalDep, session: SessionDep, days: DaysQuery = 7
) -> UsageReport:
    """Your own usage, grouped the same way."""
    return await service.own_usage(session, days=days, user_id=principal.user_id)
